"""Instruct: an LLM turns a clip's dense caption (+ title, duration) into N instruction/answer pairs.

Kinds are cycled from the config to N and asked for in order, `pairs_per_request` at a time. The endpoint's
structured output constrains the reply to a JSON schema where it can; the reply is parsed (repaired when it
is wrapped in prose or code fences, or cut off) and validated by pydantic item by item. Every expected pair
id `<clip_id>-<prompt_version>-q<i>` ends as a pair or as a Failure with a reason.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from string import Template

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from schemas import caption_reasons as reasons
from schemas.caption import InstructConfig
from schemas.records import AnnotationSample, Failure, QAPair, ShardSample, Turn, VideoResult
from stages.caption import VIDEO_TOKEN, has_annotations, video_title
from stages.llm_client import LLMClient, LLMError, SyncRunner

log = logging.getLogger(__name__)
STAGE = "instruct"
RESOURCES = {"num_cpus": 0.25}  # waits on the endpoint


class GeneratedPair(BaseModel):
    """One pair as the LLM writes it."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    kind: str = ""
    instruction: str
    answer: str

    @field_validator("instruction", "answer", mode="before")
    @classmethod
    def _text(cls, value):
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value


def clip_kinds(cfg: InstructConfig) -> list[str]:
    """The kind of each of the N pairs: the configured kinds, cycled."""
    return [cfg.kinds[i % len(cfg.kinds)] for i in range(cfg.pairs_per_clip)]


def request_plan(cfg: InstructConfig) -> list[list[tuple[int, str]]]:
    """Pair indices and kinds grouped by request."""
    per = cfg.pairs_per_request or cfg.pairs_per_clip
    indexed = list(enumerate(clip_kinds(cfg)))
    return [indexed[i:i + per] for i in range(0, len(indexed), per)]


def pairs_schema(kinds: list[str], n: int) -> dict:
    item = {"type": "object", "additionalProperties": False, "required": ["kind", "instruction", "answer"],
            "properties": {"kind": {"type": "string", "enum": sorted(set(kinds))},
                           "instruction": {"type": "string"}, "answer": {"type": "string"}}}
    return {"type": "object", "additionalProperties": False, "required": ["pairs"],
            "properties": {"pairs": {"type": "array", "items": item, "minItems": n, "maxItems": n}}}


def response_format(mode: str, schema: dict) -> dict | None:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "instruction_pairs", "schema": schema, "strict": True}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def prompt_text(cfg: InstructConfig, caption: str, title: str, duration_s: float, kinds: list[str]) -> str:
    caption = " ".join(caption.split())[:cfg.max_caption_chars]
    return Template(cfg.prompt).substitute(caption=caption, title=title or "unknown",
                                           duration_s=f"{duration_s:.1f}", kinds=", ".join(kinds), n=len(kinds))


def build_messages(cfg: InstructConfig, caption: str, title: str, duration_s: float, kinds: list[str]) -> list[dict]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return messages + [{"role": "user", "content": prompt_text(cfg, caption, title, duration_s, kinds)}]


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


async def _one_request(sample: ShardSample, video_id: str, title: str, planned: list[tuple[int, str]],
                       cfg: InstructConfig, client: LLMClient) -> tuple[list[tuple[AnnotationSample, QAPair]],
                                                                      list[Failure]]:
    clip = sample.clip
    kinds = [k for _, k in planned]
    schema = pairs_schema(kinds, len(planned))  # only the kinds asked for: a grammar keeps small models on them
    item_ids = [f"{clip.id}-{cfg.prompt_version}-q{i}" for i, _ in planned]

    def failures(ids: list[str], reason: str, detail: str) -> list[Failure]:
        return [Failure(item_id=i, video_id=video_id, stage=STAGE, reason=reason, detail=detail,
                        source=clip.source) for i in ids]

    try:
        reply = await client.chat(build_messages(cfg, clip.caption, title, clip.duration_s, kinds),
                                  prompt_version=cfg.prompt_version,
                                  response_format=response_format(client.endpoint.json_mode, schema))
    except LLMError as exc:
        reason = reasons.LLM_UNAVAILABLE if exc.transient else reasons.LLM_REQUEST_FAILED
        return [], failures(item_ids, reason, str(exc))
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
        dropped = {p.sample_id for p in pairs if p.source == "manifest" and p.kind == "caption"}
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


def apply(result: VideoResult, cfg: InstructConfig, client: LLMClient, runner: SyncRunner | None = None,
          keep_source_caption_pair: bool = True) -> VideoResult:
    """Record-level step: sync wrapper over `ainstruct` (pass the runner whose loop owns the client)."""
    coro = ainstruct(result, cfg, client, keep_source_caption_pair)
    return asyncio.run(coro) if runner is None else runner.run(coro)
