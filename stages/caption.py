"""Caption: the dense description of each clip that instruction generation works from.

The source caption (manifest, Panda-70M) is used when the clip has one; otherwise (or always, in `vlm` mode)
a VLM behind any OpenAI-compatible endpoint describes K frames sent as images. A VLM caption becomes the
clip's `caption` and one `caption` pair with its model and prompt version. Clips carrying released
annotation samples (rebuild mode) are left alone: rebuilding needs no calls at all.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
from pathlib import Path
from string import Template

from schemas import caption_reasons as reasons
from schemas.caption import CaptionConfig
from schemas.records import AnnotationSample, Failure, QAPair, ShardSample, Turn, VideoResult
from stages.llm_client import LLMClient, LLMError, SyncRunner

log = logging.getLogger(__name__)
STAGE = "caption"
RESOURCES = {"num_cpus": 0.25}  # waits on the endpoint; images are resized here (small)
VIDEO_TOKEN = "<video>"
CAPTION_INSTRUCTION = "Describe the video in detail."


def video_title(result: VideoResult) -> str:
    """The title for prompts: the source's `title` metadata, else the file name without extension."""
    if result.video is not None and result.video.metadata.get("title"):
        return result.video.metadata["title"]
    return Path(result.source or result.video_id).stem.replace("_", " ")


def has_annotations(sample: ShardSample) -> bool:
    return any(p.source == "annotation" for p in sample.pairs)


def pick_frames(frames: list[bytes], k: int) -> list[bytes]:
    """`k` frames uniformly over the clip (all of them when it has fewer)."""
    if len(frames) <= k:
        return list(frames)
    return [frames[round(i * (len(frames) - 1) / (k - 1))] for i in range(k)] if k > 1 else [frames[len(frames) // 2]]


def image_part(jpeg: bytes, max_side_px: int, detail: str) -> dict:
    """An OpenAI `image_url` content part (a JPEG data URL), downscaled to `max_side_px`."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        if max(img.size) > max_side_px:
            img = img.convert("RGB")
            img.thumbnail((max_side_px, max_side_px))
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=90)
            jpeg = buffer.getvalue()
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def caption_messages(sample: ShardSample, cfg: CaptionConfig, title: str) -> list[dict]:
    frames = pick_frames(sample.frames, cfg.num_frames)
    text = Template(cfg.prompt).substitute(num_frames=len(frames), duration_s=f"{sample.clip.duration_s:.1f}",
                                           title=title)
    parts = [{"type": "text", "text": text}]
    parts += [image_part(f, cfg.image_size_px, cfg.image_detail) for f in frames]
    return [{"role": "user", "content": parts}]


def caption_sample_id(clip_id: str, cfg: CaptionConfig) -> str:
    return f"{clip_id}-{cfg.prompt_version}-caption"


def with_vlm_caption(sample: ShardSample, text: str, cfg: CaptionConfig, model: str) -> ShardSample:
    """The clip with `caption` set and a `caption` pair from the VLM (replacing one of the same version)."""
    sample_id = caption_sample_id(sample.clip.id, cfg)
    annotation = AnnotationSample(id=sample_id, conversations=[
        Turn(speaker="human", value=f"{VIDEO_TOKEN}\n{CAPTION_INSTRUCTION}"), Turn(speaker="gpt", value=text)])
    pair = QAPair(instruction=CAPTION_INSTRUCTION, answer=text, kind="caption", source="llm", sample_id=sample_id,
                  prompt_version=cfg.prompt_version, model=model)
    return sample.model_copy(update={
        "clip": sample.clip.model_copy(update={"caption": text}),
        "samples": [s for s in sample.samples if s.id != sample_id] + [annotation],
        "pairs": [p for p in sample.pairs if p.sample_id != sample_id] + [pair],
    })


async def caption_clip(sample: ShardSample, video_id: str, title: str, cfg: CaptionConfig,
                       client: LLMClient | None) -> tuple[ShardSample, Failure | None]:
    """The clip with a dense caption, or the clip unchanged and a Failure saying why it has none."""
    if cfg.skip_annotated and has_annotations(sample):
        return sample, None
    needs_vlm = cfg.mode == "vlm" or (cfg.mode == "auto" and not sample.clip.caption)
    if not needs_vlm:
        if sample.clip.caption:
            return sample, None
        return sample, Failure(item_id=caption_sample_id(sample.clip.id, cfg), video_id=video_id, stage=STAGE,
                               reason=reasons.NO_CAPTION, detail="no source caption and caption.mode=source",
                               source=sample.clip.source)
    item_id = caption_sample_id(sample.clip.id, cfg)
    try:
        reply = await client.chat(caption_messages(sample, cfg, title), prompt_version=cfg.prompt_version)
    except LLMError as exc:
        return sample, Failure(item_id=item_id, video_id=video_id, stage=STAGE,
                               reason=reasons.CAPTION_UNAVAILABLE if exc.transient else reasons.CAPTION_REQUEST_FAILED,
                               detail=str(exc), source=sample.clip.source)
    text = " ".join(reply.text.split())
    if len(text) < cfg.min_chars:
        return sample, Failure(item_id=item_id, video_id=video_id, stage=STAGE, reason=reasons.CAPTION_EMPTY,
                               detail=f"{len(text)} chars: {text[:200]!r}", source=sample.clip.source)
    return with_vlm_caption(sample, text, cfg, client.endpoint.model), None


async def acaption(result: VideoResult, cfg: CaptionConfig, client: LLMClient | None) -> VideoResult:
    """Caption every clip of a video concurrently (the client bounds the requests in flight)."""
    if result.failed or not result.samples:
        return result
    title = video_title(result)
    outcomes = await asyncio.gather(*(caption_clip(s, result.video_id, title, cfg, client) for s in result.samples))
    result.samples = [sample for sample, _ in outcomes]
    result.failures.extend(f for _, f in outcomes if f is not None)
    return result


def apply(result: VideoResult, cfg: CaptionConfig, client: LLMClient | None = None,
          runner: SyncRunner | None = None) -> VideoResult:
    """Record-level step: sync wrapper over `acaption` (pass the runner whose loop owns the client)."""
    if runner is None:
        return asyncio.run(acaption(result, cfg, client))
    return runner.run(acaption(result, cfg, client))
