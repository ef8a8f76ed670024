"""Pairs: the instruction/answer pairs a clip carries before any LLM runs.

Released annotation samples (HICom-248K) become one pair per human/gpt exchange, kept whole as samples;
a source caption (manifest, Panda-70M) becomes one `caption` pair with a fixed instruction.
"""
from __future__ import annotations

from schemas.config import InputConfig
from schemas.records import AnnotationSample, QAPair, ShardSample, Turn, VideoResult

STAGE = "pairs"
VIDEO_TOKEN = "<video>"


def pairs_of_sample(sample: AnnotationSample) -> list[QAPair]:
    """One pair per human turn followed by a gpt turn; the `<video>` placeholder is not part of the text."""
    pairs = []
    turns = sample.conversations
    for turn_index, (ask, answer) in enumerate(zip(turns[::2], turns[1::2])):
        if ask.speaker != "human" or answer.speaker != "gpt":
            continue
        instruction = ask.value.replace(VIDEO_TOKEN, "").strip()
        pairs.append(QAPair(instruction=instruction, answer=answer.value, kind="annotation",
                            source="annotation", sample_id=sample.id, turn=turn_index))
    return pairs


def caption_sample(clip_id: str, caption: str, instruction: str) -> tuple[AnnotationSample, QAPair]:
    sample_id = f"{clip_id}-caption"
    sample = AnnotationSample(id=sample_id, conversations=[
        Turn(speaker="human", value=f"{VIDEO_TOKEN}\n{instruction}"),
        Turn(speaker="gpt", value=caption),
    ])
    pair = QAPair(instruction=instruction, answer=caption, kind="caption", source="manifest", sample_id=sample_id)
    return sample, pair


def attach_pairs(sample: ShardSample, cfg: InputConfig) -> ShardSample:
    """Fill `pairs` (and `samples` for captions) from what the clip brought with it."""
    if sample.samples:
        pairs = [p for s in sample.samples for p in pairs_of_sample(s)]
        return sample.model_copy(update={"pairs": pairs})
    if sample.clip.caption:
        annotation, pair = caption_sample(sample.clip.id, sample.clip.caption, cfg.caption_instruction)
        return sample.model_copy(update={"samples": [annotation], "pairs": [pair]})
    return sample


def apply(result: VideoResult, cfg: InputConfig) -> VideoResult:
    result.samples = [attach_pairs(s, cfg) for s in result.samples]
    return result
