"""Instruct: an LLM (or a VLM) turns a clip's dense caption into N instruction/answer pairs.

Kinds are cycled from the config to N and asked for in order, `pairs_per_request` at a time. With
`input: frames_and_caption` the request also carries the clip's frames as images: step 2 of the paper's
chain of thought (the caption is step 1). The reply's JSON schema is built from the pydantic models below
and constrains the output where the endpoint can; the reply is parsed (repaired when it is wrapped in prose
or code fences, or cut off) and validated item by item. A reply without all the pairs asked for is retried
and never cached; after the retries what could be salvaged is kept. Every expected pair id
`<clip_id>-<prompt_version>-q<i>` ends as a pair or as a Failure with a reason.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from string import Template
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from schemas import caption_reasons as reasons
from schemas.caption import InstructConfig
from schemas.records import AnnotationSample, Failure, QAPair, ShardSample, Turn, VideoResult
from stages.caption import VIDEO_TOKEN, has_annotations, image_parts, pick_frames, request_failure_reason, \
    response_format, video_title
from stages.llm import ChatResult, LLMClient, LLMError

log = logging.getLogger(__name__)
STAGE = "instruct"
RESOURCES = {"num_cpus": 0.25}  # waits on the endpoint


class GeneratedPair(BaseModel):
    """One pair as the LLM writes it."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True,
                              json_schema_extra={"additionalProperties": False})
    kind: str = ""
    instruction: str
    answer: str

    @field_validator("instruction", "answer", mode="before")
    @classmethod
    def _text(cls, value):
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value


def pairs_schema(kinds: list[str], n: int) -> dict:
    """The reply's JSON schema, from pydantic models: exactly `n` pairs of the kinds asked for (a grammar
    keeps small models on them)."""
    kind_type = Literal[tuple(sorted(set(kinds)))]
    item = create_model("InstructionPair", __base__=GeneratedPair, kind=(kind_type, ...))
    reply = create_model("InstructionPairs", __config__=ConfigDict(json_schema_extra={"additionalProperties": False}),
                         pairs=(list[item], Field(min_length=n, max_length=n)))
    return reply.model_json_schema()


def clip_kinds(cfg: InstructConfig) -> list[str]:
    """The kind of each of the N pairs: the configured kinds, cycled."""
    return [cfg.kinds[i % len(cfg.kinds)] for i in range(cfg.pairs_per_clip)]


def request_plan(cfg: InstructConfig) -> list[list[tuple[int, str]]]:
    """Pair indices and kinds grouped by request."""
    per = cfg.pairs_per_request or cfg.pairs_per_clip
    indexed = list(enumerate(clip_kinds(cfg)))
    return [indexed[i:i + per] for i in range(0, len(indexed), per)]


def prompt_text(cfg: InstructConfig, caption: str, title: str, duration_s: float, kinds: list[str],
                images_sent: int = 0) -> str:
    caption = " ".join(caption.split())[:cfg.max_caption_chars]
    return Template(cfg.template).substitute(caption=caption, title=title or "unknown", images_sent=images_sent,
                                             duration_s=f"{duration_s:.1f}", kinds=", ".join(kinds), n=len(kinds))


def build_messages(cfg: InstructConfig, sample: ShardSample, title: str, kinds: list[str]) -> list[dict]:
    """The request: the prompt (+ the clip's frames as images with `input: frames_and_caption`)."""
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    clip = sample.clip
    if cfg.input == "caption":
        return messages + [{"role": "user", "content": prompt_text(cfg, clip.caption, title, clip.duration_s, kinds)}]
    frames = pick_frames(sample.frames, cfg.images_per_request)
    text = prompt_text(cfg, clip.caption, title, clip.duration_s, kinds, len(frames))
    return messages + [{"role": "user", "content": [
        {"type": "text", "text": text}, *image_parts(frames, cfg.images_per_request, cfg.image_size_px, cfg.image_detail)]}]


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return json.loads(_TRAILING_COMMA.sub(r"\1", text))


def _salvage_items(text: str) -> list:
    """Complete objects of a cut-off `"pairs": [ {...}, {...}, {..` array."""
    start = text.find("[")
    if start < 0:
        return []
    decoder, items, pos = json.JSONDecoder(), [], start + 1
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break
        items.append(item)
    return items


def parse_reply(text: str) -> tuple[list, str | None]:
    """The raw pair items of a reply and None, or what could be salvaged and a reason code.
    Repairs: code fences, prose around the JSON object, trailing commas, a cut-off array."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    first, last = text.find("{"), text.rfind("}")
    if 0 <= first < last:
        candidates.append(text[first:last + 1])
    for candidate in candidates:
        try:
            data = _loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("pairs"), list):
            return data["pairs"], None
        if isinstance(data, list):
            return data, None
        if isinstance(data, dict) and {"instruction", "answer"} <= set(data):
            return [data], None
        return [], reasons.LLM_SCHEMA_INVALID
    salvaged = _salvage_items(text)
    return salvaged, reasons.LLM_MALFORMED_JSON


def make_pair(clip_id: str, index: int, kind: str, generated: GeneratedPair, cfg: InstructConfig,
              model: str) -> tuple[AnnotationSample, QAPair]:
    sample_id = f"{clip_id}-{cfg.prompt_version}-q{index}"
    sample = AnnotationSample(id=sample_id, conversations=[
        Turn(speaker="human", value=f"{VIDEO_TOKEN}\n{generated.instruction}"),
        Turn(speaker="gpt", value=generated.answer)])
    pair = QAPair(instruction=generated.instruction, answer=generated.answer, kind=kind, source="llm",
                  sample_id=sample_id, prompt_version=cfg.prompt_version, model=model)
    return sample, pair


def pairs_validator(n: int):
    """A reply counts (and is cached) only when it holds `n` pairs that validate."""

    def validate(reply: ChatResult) -> None:
        items, problem = parse_reply(reply.text)
        if problem is not None or len(items) < n:
            raise ValueError(f"{problem or reasons.LLM_MISSING_PAIR}: {len(items)} of {n} pairs: {reply.text[:200]!r}")
        for item in items[:n]:
            try:
                GeneratedPair.model_validate(item)
            except ValidationError as exc:
                raise ValueError(f"{reasons.LLM_SCHEMA_INVALID}: {exc.error_count()} error(s)") from None

    return validate


async def _one_request(sample: ShardSample, video_id: str, title: str, planned: list[tuple[int, str]],
                       cfg: InstructConfig, client: LLMClient) -> tuple[list[tuple[AnnotationSample, QAPair]],
                                                                      list[Failure]]:
    clip = sample.clip
    kinds = [k for _, k in planned]
    schema = pairs_schema(kinds, len(planned))
    item_ids = [f"{clip.id}-{cfg.prompt_version}-q{i}" for i, _ in planned]

    def failures(ids: list[str], reason: str, detail: str) -> list[Failure]:
        return [Failure(item_id=i, video_id=video_id, stage=STAGE, reason=reason, detail=detail,
                        source=clip.source) for i in ids]

    try:
        reply = await client.chat(build_messages(cfg, sample, title, kinds), prompt_version=cfg.prompt_version,
                                  response_format=response_format(client.endpoint.json_mode, schema,
                                                                  "instruction_pairs"),
                                  validate=pairs_validator(len(planned)))
    except LLMError as exc:
        if exc.reply is None:
            reason = request_failure_reason(exc, reasons.LLM_UNAVAILABLE, reasons.LLM_REQUEST_FAILED,
                                            reasons.LLM_MALFORMED_JSON)
            return [], failures(item_ids, reason, str(exc))
        reply = exc.reply  # invalid after the retries (not cached): keep what can be salvaged
    items, problem = parse_reply(reply.text)
    made, lost = [], []
    for slot, (index, kind) in enumerate(planned):
        if slot >= len(items):
            reason = problem or reasons.LLM_MISSING_PAIR
            if problem and reply.finish_reason == "length":
                reason = reasons.LLM_TRUNCATED
            lost += failures([item_ids[slot]], reason, f"{len(items)} of {len(planned)} pairs in the reply: "
                                                       f"{reply.text[:300]!r}")
            continue
        try:
            generated = GeneratedPair.model_validate(items[slot])
        except ValidationError as exc:
            lost += failures([item_ids[slot]], reasons.LLM_SCHEMA_INVALID,
                             f"{exc.error_count()} error(s): {str(items[slot])[:300]!r}")
            continue
        final_kind = generated.kind if generated.kind in cfg.kinds else kind
        made.append(make_pair(clip.id, index, final_kind, generated, cfg, client.endpoint.model))
    return made, lost


async def instruct_clip(sample: ShardSample, video_id: str, title: str, cfg: InstructConfig, client: LLMClient,
                        keep_source_caption_pair: bool = True) -> tuple[ShardSample, list[Failure]]:
    """The clip with its generated pairs added (replacing pairs of the same prompt version), and failures."""
    if has_annotations(sample) or not sample.clip.caption:
        return sample, []  # rebuild mode, or no caption (the caption stage said why)
    outcomes = await asyncio.gather(*(_one_request(sample, video_id, title, planned, cfg, client)
                                      for planned in request_plan(cfg)))
    made = [m for ms, _ in outcomes for m in ms]
    lost = [f for _, fs in outcomes for f in fs]
    prefix = f"{sample.clip.id}-{cfg.prompt_version}-q"
    samples = [s for s in sample.samples if not s.id.startswith(prefix)]
    pairs = [p for p in sample.pairs if not p.sample_id.startswith(prefix)]
    if not keep_source_caption_pair:
        dropped = {p.sample_id for p in pairs if p.kind == "caption"}  # the manifest's or the VLM's caption
        samples = [s for s in samples if s.id not in dropped]
        pairs = [p for p in pairs if p.sample_id not in dropped]
    update = {"samples": samples + [s for s, _ in made], "pairs": pairs + [p for _, p in made]}
    return sample.model_copy(update=update), lost


async def ainstruct(result: VideoResult, cfg: InstructConfig, client: LLMClient,
                    keep_source_caption_pair: bool = True) -> VideoResult:
    if result.failed or not result.samples:
        return result
    title = video_title(result)
    outcomes = await asyncio.gather(*(instruct_clip(s, result.video_id, title, cfg, client, keep_source_caption_pair)
                                      for s in result.samples))
    result.samples = [s for s, _ in outcomes]
    result.failures.extend(f for _, fs in outcomes for f in fs)
    return result
