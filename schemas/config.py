"""Run configuration: typed, defaulted, explained. YAML files validate into `RunConfig`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from schemas.caption import CaptioningConfig
from schemas.config_base import StrictConfig
from schemas.overrides import apply_overrides
from schemas.recipe import EmbedderConfig, RecipeConfig


class _Config(StrictConfig):
    pass


_URI_CREDENTIALS = re.compile(r"://[^/@?]*@|[?&](access_key|secret_key|session_token)=", re.IGNORECASE)


class InputConfig(_Config):
    """Where source videos come from (local paths or object-store URIs such as `s3://bucket/videos/`)."""

    # The resolved config is saved in the run directory: a URI must not carry credentials (use AWS_* env vars).
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    kind: Literal["auto", "directory", "manifest", "llava"] = "auto"
    path: str | None = None  # directory, manifest (csv/parquet/jsonl) or LLaVA json/jsonl
    # Every video path must resolve under this root; defaults to the directory (or the manifest's folder).
    data_root: str | None = None
    extensions: list[str] = Field(
        default_factory=lambda: [".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv"]
    )
    # Manifest columns (Panda-70M metadata uses `url`/`timestamp`/`caption` lists per video).
    path_column: str = "path"
    start_column: str = "start_s"
    end_column: str = "end_s"
    caption_column: str = "caption"
    timestamp_column: str = "timestamp"  # Panda-70M: list of ["HH:MM:SS.mmm", "HH:MM:SS.mmm"]
    # Instruction used to turn a manifest caption into a pair until the captioning stage runs.
    caption_instruction: str = "Describe the video in detail."
    hash_files: bool = True  # sha256 of every source file (provenance); costs one read per file

    @field_validator("path", "data_root")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value and _URI_CREDENTIALS.search(value):
            raise ValueError("credentials in an input URI would be saved with the run; give them in the "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables instead")
        return value


class ProbeConfig(_Config):
    """Limits that reject inputs before any decoding is spent on them."""

    max_file_bytes: int = 50 * 1024**3
    max_duration_s: float = 4 * 3600.0
    min_duration_s: float = 0.0  # a one-frame video is still a video; split decides if it makes a clip
    max_side_px: int = 4096  # 8K sources are rejected by default: decoding them costs 4x 4K
    timeout_s: float = 60.0


class SplitConfig(_Config):
    """How a video becomes clips."""

    mode: Literal["scene", "fixed", "given"] = "scene"
    min_clip_s: float = 1.0  # shorter scenes are dropped (or merged into a neighbour when possible)
    max_clip_s: float = 10.0  # longer shots are cut into pieces of at most this length
    scene_threshold: float = 0.3  # FFmpeg scene score (0..1) that starts a new shot
    # Scene detector: ffmpeg (the scene score above) or pyscenedetect (PySceneDetect's ContentDetector, the
    # paper's tool); bench/split_detectors.py compares them.
    detector: Literal["ffmpeg", "pyscenedetect"] = "ffmpeg"
    content_threshold: float = 27.0  # ContentDetector threshold (its default 27); higher: fewer cuts
    window_s: float = 4.0  # fixed mode
    stride_s: float = 4.0  # fixed mode; < window_s overlaps
    timeout_s: float = 600.0


class ClipConfig(_Config):
    """Clip encoding and frame sampling. Defaults follow HICom's conditional pre-training."""

    RENAMED = {"num_frames": "clip.frames_per_clip"}
    frames_per_clip: int = Field(32, ge=1)  # frames sampled uniformly from each clip into its shard sample
    frame_size_px: int = 384  # SigLIP so400m-patch14-384 input
    pad_rgb: tuple[int, int, int] = (127, 127, 127)  # SigLIP image_mean 0.5 -> the release's pad colour
    jpeg_qscale: int = Field(3, ge=2, le=31)  # ffmpeg -q:v for frames (2 best)
    write_mp4: bool = True
    mp4_max_side_px: int = 384
    mp4_crf: int = 23
    mp4_preset: str = "veryfast"
    stream_copy: bool = True  # copy instead of re-encode when a clip starts on a keyframe and fits
    # A video with more planned clips than this is fanned out into batches of about this many clips that
    # decode on several workers at once (a 2 h source is no longer one task holding ~450 MB of samples).
    clips_per_task: int = Field(32, ge=1)
    clips_per_ffmpeg: int = Field(8, ge=1)  # clips cut by one FFmpeg process (decode once, bounded memory)
    ffmpeg_threads: int = 1  # threads per FFmpeg process; Ray runs one process per CPU
    timeout_s: float = 600.0  # per FFmpeg process
    # Where FFmpeg writes a batch's frames and mp4s before they are read into the part: unset, /dev/shm when it
    # has 1 GiB free (they never touch a disk), else the system temp folder (`stages/scratch.py`). Not saved
    # with the run (it does not change the output), so a resume may choose another.
    scratch_dir: str | None = Field(None, exclude=True)


class ShardConfig(_Config):
    """WebDataset shard limits. A video's clips always land in one shard."""

    max_samples: int = 1000  # per compacted shard
    max_bytes: int = 1024**3
    # Videos a worker commits together as one small part: a kill loses at most the parts in flight.
    videos_per_part: int = Field(4, ge=1)
    compact: bool = True  # merge the parts into full-size shards when the build ends (else `hicom compact`)


class RayConfig(_Config):
    """Where and how wide to run."""

    address: str | None = None  # None: a local Ray; "auto" or "ray://host:10001" for a cluster
    num_cpus: int | None = None  # local Ray only
    preserve_order: bool = True  # parts cut from consecutive videos in input order: the same input, the same parts
    max_video_tasks: int | None = Field(None, ge=1)  # video/clip-batch tasks submitted at once; None: 2 per video CPU

    RETIRED = dict.fromkeys(("probe_concurrency", "clip_concurrency", "op_resource_reservation"),
                            "the build's stages no longer run on Ray Data's executor (see ray.max_video_tasks)")


class RunConfig(_Config):
    """One build: input -> probe -> split -> clip+decode -> shard."""

    name: str = "hicom-run"
    input: InputConfig = Field(default_factory=InputConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    captioning: CaptioningConfig | None = None  # caption -> instruct -> filter; None: pairs from sources only
    recipe: RecipeConfig | None = None  # HICom-248K's length / keyframe / category steps (schemas/recipe.py)
    embedder: EmbedderConfig | None = None  # the image-text model of recipe.keyframes / recipe.categories

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.split.min_clip_s > self.split.max_clip_s:
            raise ValueError("split.min_clip_s must be <= split.max_clip_s")
        if self.split.stride_s <= 0 or self.split.window_s <= 0:
            raise ValueError("split.window_s and split.stride_s must be > 0")
        if self.recipe is not None and self.recipe.needs_embedder and self.embedder is None:
            raise ValueError("recipe.keyframes/recipe.categories need an `embedder:` section")
        return self


def load_run_config(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML config (or defaults when `path` is None) and apply dotted-key overrides."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return RunConfig.model_validate(apply_overrides(data, overrides))
