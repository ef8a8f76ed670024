"""Caption: the dense description of each clip that instruction generation works from.

The source caption (manifest, Panda-70M) is used when the clip has one; otherwise (or always, in `vlm` mode)
a VLM behind any OpenAI-compatible endpoint describes K frames sent as images (step 1 of the paper's chain of
thought). The reply is structured (`CaptionReply`, JSON schema from the pydantic model) unless the endpoint's
`json_mode` is `none`; a reply that does not validate is retried and never cached. A VLM caption becomes the
clip's `caption` and one `caption` pair with its model and prompt version. Clips carrying released
annotation samples (rebuild mode) are left alone: rebuilding needs no calls at all.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
from string import Template

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas import caption_reasons as reasons
from schemas.caption import CaptionConfig
from schemas.records import AnnotationSample, Failure, QAPair, ShardSample, Turn, VideoResult
from stages.llm import ChatResult, EndpointRejected, LLMClient, LLMError

log = logging.getLogger(__name__)
STAGE = "caption"
RESOURCES = {"num_cpus": 0.25}  # waits on the endpoint; images are resized here (small)
VIDEO_TOKEN = "<video>"
CAPTION_INSTRUCTION = "Describe the video in detail."
UNKNOWN_TITLE = "unknown"


class CaptionReply(BaseModel):
    """The VLM's structured reply (its JSON schema constrains the output where the endpoint can)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})
    caption: str


def video_title(result: VideoResult) -> str:
    """The title for prompts: the source's `title` metadata (container tag or manifest column), else
    `unknown`. File names are not titles (`data__bikes.mp4` is not "data  bikes")."""
    if result.video is not None and result.video.metadata.get("title", "").strip():
        return " ".join(result.video.metadata["title"].split())
    return UNKNOWN_TITLE


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


def image_parts(frames: list[bytes], k: int, max_side_px: int, detail: str) -> list[dict]:
    return [image_part(f, max_side_px, detail) for f in pick_frames(frames, k)]


def response_format(mode: str, schema: dict, name: str) -> dict | None:
    """The request's `response_format` for the endpoint's `json_mode` (None: the prompt alone)."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def caption_messages(sample: ShardSample, cfg: CaptionConfig, title: str) -> list[dict]:
    frames = pick_frames(sample.frames, cfg.images_per_request)
    text = Template(cfg.prompt).substitute(images_sent=len(frames), duration_s=f"{sample.clip.duration_s:.1f}",
                                           title=title)
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *image_parts(frames, cfg.images_per_request, cfg.image_size_px, cfg.image_detail)]}]


def caption_text(reply: ChatResult, structured: bool) -> str:
    """The caption of a reply, whitespace-normalised; ValueError when the reply is not a caption."""
    text = reply.text
    if structured:
        try:
            text = CaptionReply.model_validate_json(text).caption
        except ValidationError as exc:
            raise ValueError(f"not a caption object: {text[:200]!r} ({exc.error_count()} error(s))") from None
    return " ".join(text.split())


def caption_validator(cfg: CaptionConfig, structured: bool):
    """Checks a reply before it counts (and before it is cached): a caption of at least `min_chars`."""

    def validate(reply: ChatResult) -> None:
        text = caption_text(reply, structured)
        if len(text) < cfg.min_chars:
            raise ValueError(f"{len(text)} chars < {cfg.min_chars}: {text[:200]!r}")

    return validate


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


def request_failure_reason(exc: LLMError, unavailable: str, refused: str, malformed: str) -> str:
    """The reason code of a call that gave up: endpoint rejected / away / bad replies / refused."""
    if isinstance(exc, EndpointRejected):
        return reasons.ENDPOINT_REJECTED
    if exc.transient:
        return unavailable
    return malformed if exc.kind == "bad_response" else refused


async def caption_clip(sample: ShardSample, video_id: str, title: str, cfg: CaptionConfig,
                       client: LLMClient | None) -> tuple[ShardSample, Failure | None]:
    """The clip with a dense caption, or the clip unchanged and a Failure saying why it has none."""
    if cfg.skip_annotated and has_annotations(sample):
        return sample, None
    needs_vlm = cfg.mode == "vlm" or (cfg.mode == "auto" and not sample.clip.caption)
    item_id = caption_sample_id(sample.clip.id, cfg)
    if not needs_vlm:
        if sample.clip.caption:
            return sample, None
        return sample, Failure(item_id=item_id, video_id=video_id, stage=STAGE, reason=reasons.NO_CAPTION,
                               detail="no source caption and caption.mode=source", source=sample.clip.source)
    structured = client.endpoint.json_mode != "none"
    schema = CaptionReply.model_json_schema()
    try:
        reply = await client.chat(caption_messages(sample, cfg, title), prompt_version=cfg.prompt_version,
                                  response_format=response_format(client.endpoint.json_mode, schema, "dense_caption"),
                                  validate=caption_validator(cfg, structured))
    except LLMError as exc:
        reason = request_failure_reason(exc, reasons.CAPTION_UNAVAILABLE, reasons.CAPTION_REQUEST_FAILED,
                                        reasons.CAPTION_EMPTY)
        return sample, Failure(item_id=item_id, video_id=video_id, stage=STAGE, reason=reason, detail=str(exc),
                               source=sample.clip.source)
    return with_vlm_caption(sample, caption_text(reply, structured), cfg, client.endpoint.model), None


async def acaption(result: VideoResult, cfg: CaptionConfig, client: LLMClient | None) -> VideoResult:
    """Caption every clip of a video concurrently (the client bounds the requests in flight)."""
    if result.failed or not result.samples:
        return result
    title = video_title(result)
    outcomes = await asyncio.gather(*(caption_clip(s, result.video_id, title, cfg, client) for s in result.samples))
    result.samples = [sample for sample, _ in outcomes]
    result.failures.extend(f for _, f in outcomes if f is not None)
    return result
