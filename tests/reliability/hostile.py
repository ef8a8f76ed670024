"""Generators of hostile inputs: each function writes one bad (or odd but valid) input and names the outcome."""
from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from conftest import ffmpeg, make_test_video
from schemas import reasons

OK = "ok"  # processed into clips


@dataclass
class Case:
    name: str
    path: Path
    expected: str  # a reason code, or OK


def _patch_durations(data: bytearray, value: int) -> bytearray:
    """Overwrite the version-0 duration fields of mvhd/mdhd/tkhd: a file claiming to last for weeks."""
    for box, offset in ((b"mvhd", 20), (b"mdhd", 20), (b"tkhd", 24)):
        i = data.find(box)
        while i != -1:
            if data[i + 4] == 0:
                struct.pack_into(">I", data, i + offset, value)
            i = data.find(box, i + 1)
    return data


def _scramble_moov(data: bytearray) -> bytearray:
    at = data.find(b"moov")
    size = struct.unpack(">I", data[at - 4:at])[0]
    rng = random.Random(7)
    for k in range(at + 4, at - 4 + size):
        data[k] = rng.randrange(256)
    return data


def make_cases(folder: Path, outside: Path) -> list[Case]:
    """Hostile video files in `folder`; `outside` is a directory that nothing may read from."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    secret = make_test_video(outside / "secret.mp4", seconds=2.0)
    base = make_test_video(folder / "base.mp4", seconds=3.0)
    faststart = folder / "faststart.src"
    ffmpeg("-i", str(base), "-c", "copy", "-movflags", "+faststart", "-f", "mp4", str(faststart))
    data = base.read_bytes()
    fast = faststart.read_bytes()
    faststart.unlink()
    cases = [Case(base.name, base, OK)]

    def write(name: str, content: bytes, expected: str) -> None:
        path = folder / name
        path.write_bytes(content)
        cases.append(Case(name, path, expected))

    write("zero.mp4", b"", reasons.EMPTY_FILE)
    for fraction in (0.1, 0.5, 0.9):  # moov at the end: any cut loses the index
        write(f"truncated_{int(fraction * 100)}.mp4", data[: int(len(data) * fraction)], reasons.TRUNCATED)
    write("fast_truncated_60.mp4", fast[: int(len(fast) * 0.6)], OK)  # index intact: the first part survives
    write("text.mp4", b"hello, I am not a video\n" * 20, reasons.NOT_A_VIDEO)
    write("corrupt_moov.mp4", bytes(_scramble_moov(bytearray(data))), reasons.TRUNCATED)
    write("long_duration.mp4", bytes(_patch_durations(bytearray(data), 0xFFFFFFF0)), reasons.TOO_LONG)
    mkv = folder / "wrong_ext.avi"  # an mp4 under another extension: demuxed by content
    mkv.write_bytes(data)
    cases.append(Case(mkv.name, mkv, OK))
    ffmpeg("-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac", "-f", "mp4", str(folder / "audio_only.mp4"))
    cases.append(Case("audio_only.mp4", folder / "audio_only.mp4", reasons.NO_VIDEO_STREAM))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=1", "-frames:v", "1", "-c:v", "png", "-f", "image2",
           str(folder / "image.mp4"))
    cases.append(Case("image.mp4", folder / "image.mp4", reasons.STILL_IMAGE))
    ffmpeg("-f", "lavfi", "-i", "color=size=7680x4320:rate=1", "-frames:v", "1", "-c:v", "libx264", "-preset",
           "ultrafast", str(folder / "8k.mp4"))
    cases.append(Case("8k.mp4", folder / "8k.mp4", reasons.TOO_LARGE_FRAME))
    cases.append(Case("one_frame.mp4", make_test_video(folder / "one_frame.mp4", seconds=0.04), reasons.NO_CLIPS))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25", "-frames:v", "0", "-c:v", "libx264",
           str(folder / "zero_frames.mp4"))
    cases.append(Case("zero_frames.mp4", folder / "zero_frames.mp4", reasons.ZERO_DURATION))
    for name in ("with space.mp4", "new\nline.mp4", "ünïcødé-视频.mp4"):
        cases.append(Case(name, make_test_video(folder / name, seconds=2.0), OK))
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{secret}\n#EXT-X-ENDLIST\n"
    write("playlist.mp4", playlist.encode(), reasons.FORBIDDEN_REFERENCE)
    write("concat.mp4", f"ffconcat version 1.0\nfile '{secret}'\n".encode(), reasons.FORBIDDEN_REFERENCE)
    url_playlist = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n"
    write("url_playlist.mp4", url_playlist.encode(), reasons.FORBIDDEN_REFERENCE)
    os.symlink(folder / "loop_a.mp4", folder / "loop_b.mp4")
    os.symlink(folder / "loop_b.mp4", folder / "loop_a.mp4")
    cases += [Case("loop_a.mp4", folder / "loop_a.mp4", reasons.UNREADABLE),
              Case("loop_b.mp4", folder / "loop_b.mp4", reasons.UNREADABLE)]
    os.symlink("base.mp4", folder / "alias.mp4")  # a second name for a file in the same folder
    cases.append(Case("alias.mp4", folder / "alias.mp4", reasons.DUPLICATE_SOURCE))
    os.symlink(secret, folder / "escape.mp4")
    cases.append(Case("escape.mp4", folder / "escape.mp4", reasons.PATH_ESCAPES_ROOT))
    return cases
