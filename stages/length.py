"""Length: keep planned clips of min..max seconds (HICom-248K: 5-120 s); the others are failure rows.

Runs after split. The recipe lets split keep every shot whole (no cutting of long shots, no silent drop of
short ones) so that this rule, with its reasons, decides, as the paper's "keep clips of 5-120 s" does.
"""
from __future__ import annotations

from schemas import reasons
from schemas.records import ClipRecord, Failure, VideoResult
from schemas.recipe import LengthConfig

STAGE = "length"
RESOURCES = {"num_cpus": 0.1}  # arithmetic on the planned spans only


def length_reason(duration_s: float, cfg: LengthConfig) -> str | None:
    """`too_short`, `too_long`, or None for a clip to keep."""
    if duration_s < cfg.min_clip_s - 1e-6:
        return reasons.TOO_SHORT
    if duration_s > cfg.max_clip_s + 1e-6:
        return reasons.TOO_LONG
    return None


def apply(result: VideoResult, cfg: LengthConfig) -> VideoResult:
    """Drop planned clips outside the length range, one failure row (keyed by clip id) per dropped clip."""
    kept = []
    for span in result.planned:
        duration = span.end_s - span.start_s
        reason = length_reason(duration, cfg)
        if reason is None:
            kept.append(span)
            continue
        row = f", manifest row {span.row}" if span.row is not None else ""
        for item in [s.id for s in span.samples] or [ClipRecord.make_id(result.video_id, span.start_s, span.end_s)]:
            result.failures.append(Failure(
                item_id=item, video_id=result.video_id, stage=STAGE, reason=reason, source=result.source,
                detail=f"clip [{span.start_s}, {span.end_s}) is {duration:.2f}s, outside "
                       f"{cfg.min_clip_s}-{cfg.max_clip_s}s{row}"))
    result.planned = kept
    if not kept:
        result.failed = True
    return result
