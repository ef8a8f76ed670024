"""Records that flow through the pipeline: video -> clips -> pairs -> shard sample, plus failures.

Every record carries its id and provenance. Times are seconds from the start of the video stream.
"""
from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Turn(_Record):
    """One LLaVA conversation turn: `from` is `human` or `gpt`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str


class AnnotationSample(_Record):
    """A LLaVA-format sample as released (HICom-248K): kept whole, multi-turn included."""

    id: str
    conversations: list[Turn]

    def llava_conversations(self) -> list[dict]:
        return [{"from": t.speaker, "value": t.value} for t in self.conversations]


class QAPair(_Record):
    """One instruction/answer pair on a clip, with where it came from."""

    instruction: str
    answer: str
    kind: str = "caption"
    source: Literal["annotation", "manifest", "llm"] = "manifest"
    sample_id: str
    turn: int = 0
    prompt_version: str | None = None
    model: str | None = None
    scores: dict[str, float] = Field(default_factory=dict)


class Span(_Record):
    """A time range of a video, optionally with what the source says about it."""

    start_s: float
    end_s: float | None = None  # None: to the end of the video
    caption: str | None = None
    samples: list[AnnotationSample] = Field(default_factory=list)
    row: int | None = None  # the manifest/annotation row it came from (1-based line), None for directories
    # Its failure rows' key, the same one ingest uses for its row (`stages.ingest.entries.row_item_id`):
    # `m.csv:7`, or `m.csv:7.2` for the third span of a Panda-70M row; None for directories.
    item_id: str | None = None


class ProbeInfo(_Record):
    """What ffprobe says about a video. Width/height are display size (after rotation)."""

    duration_s: float  # what the frames cover (a truncated file may declare more)
    declared_duration_s: float = 0.0  # what the container says
    fps: float
    width: int
    height: int
    codec: str
    pix_fmt: str | None = None
    rotation_deg: int = 0
    has_audio: bool = False
    format_name: str = ""
    bit_rate: int | None = None
    total_frames: int  # frames the source holds (what its frames cover, see duration_s)
    frame_times_s: list[float] = Field(default_factory=list, repr=False)
    keyframe_times_s: list[float] = Field(default_factory=list, repr=False)


class VideoRecord(_Record):
    """A source video as ingested; `probe` is filled by the probe stage."""

    id: str
    source: str  # absolute resolved path
    relpath: str  # path under the data root, as given by the input
    size_bytes: int = 0
    sha256: str | None = None
    spans: list[Span] = Field(default_factory=list)  # given spans (manifest/annotations); empty: none given
    metadata: dict[str, str] = Field(default_factory=dict)
    probe: ProbeInfo | None = None
    keyframe_times_s: list[float] | None = None  # recipe.keyframes: None when the stage did not run
    category: str | None = None  # recipe.categories: the best category sentence and its similarity
    category_score: float | None = None


class ClipRecord(_Record):
    """A clip cut from a video: id is `<video_id>_<start_ms>_<end_ms>`."""

    id: str
    video_id: str
    source: str
    start_s: float
    end_s: float
    frame_times_s: list[float]
    frame_indices: list[int]  # indices into the clip's own frames, as the release samples them
    # frames of the source inside the clip's span (the frames stored are `frame_indices` of them); shards
    # written before the rename call it num_clip_frames
    frames_in_clip: int = Field(validation_alias=AliasChoices("frames_in_clip", "num_clip_frames"))
    frames_padded: int = 0  # frames repeated because decoding returned fewer than planned
    frame_size_px: int
    mp4_width: int | None = None
    mp4_height: int | None = None
    mp4_bytes: int = 0
    frames_bytes: int = 0
    mp4_stream_copied: bool = False
    caption: str | None = None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @staticmethod
    def make_id(video_id: str, start_s: float, end_s: float) -> str:
        return f"{video_id}_{round(start_s * 1000):d}_{round(end_s * 1000):d}"


class ShardSample(_Record):
    """One WebDataset sample: a clip, its frames (JPEG bytes), optional mp4, and its pairs."""

    clip: ClipRecord
    frames: list[bytes] = Field(repr=False)
    mp4: bytes | None = Field(default=None, repr=False)
    samples: list[AnnotationSample] = Field(default_factory=list)
    pairs: list[QAPair] = Field(default_factory=list)

    def metadata(self) -> dict:
        """The sample's `json` member: clip metadata, LLaVA samples and pairs with provenance."""
        return {
            **self.clip.model_dump(),
            "duration_s": self.clip.duration_s,
            "samples": [
                {"id": s.id, "conversations": s.llava_conversations()} for s in self.samples
            ],
            "pairs": [p.model_dump() for p in self.pairs],
        }


class Failure(_Record):
    """An input (or part of one) that did not make it, with the stage and a reason code."""

    item_id: str
    stage: str
    reason: str
    detail: str = ""
    source: str = ""
    video_id: str | None = None


class VideoResult(_Record):
    """Everything one source video produced as it moves through the stages. The unit of commit:
    a video's samples and failures always land in the same shard."""

    video_id: str
    source: str = ""
    video: VideoRecord | None = None
    planned: list[Span] = Field(default_factory=list)  # clips decided by split
    samples: list[ShardSample] = Field(default_factory=list)
    failures: list[Failure] = Field(default_factory=list)
    failed: bool = False  # a video-level failure: later stages skip it
    node_id: str | None = None  # the Ray node that decoded it (provenance for cluster runs)
    # A long video fanned out into clip batches (`clip.clips_per_task`): (index, count) of this row's batch.
    # Each batch commits on its own; the video is committed once all `count` batches are (pipeline/resume.py).
    batch: tuple[int, int] | None = None

    @property
    def commit_id(self) -> str:
        """What a part commits for this row: the video id, or `<video id>#<index>/<count>` for a batch."""
        return self.video_id if self.batch is None else f"{self.video_id}#{self.batch[0]}/{self.batch[1]}"

    @property
    def counts_as_video(self) -> bool:
        """Whether this row counts one video in part and receipt totals (a fanned-out video: its batch 0)."""
        return self.batch is None or self.batch[0] == 0

    def fail_video(self, stage: str, reason: str, detail: str) -> "VideoResult":
        """Record a video-level failure: one per annotation sample when the video carries samples,
        so every released sample is accounted for, else one for the video."""
        sample_ids = [s.id for span in (self.video.spans if self.video else []) for s in span.samples]
        for item_id in sample_ids or [self.video_id]:
            self.failures.append(Failure(item_id=item_id, video_id=self.video_id, stage=stage, reason=reason,
                                         detail=detail, source=self.source))
        self.failed = True
        return self
