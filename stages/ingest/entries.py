"""Entries: what every reader produces, and how entries of one source file become one `VideoRecord`.

A reader (directory, manifest, LLaVA) turns its input into `Entry`s: a path as given plus, optionally, a
span and metadata, and the row it came from. Each entry is located under the data root (or refused), and the
entries of one source file are grouped onto one video, spans in row order. A span listed twice for the same
video is reported (`duplicate_span`), never merged silently.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas import reasons
from schemas.records import Failure, Span, VideoRecord, VideoResult
from stages.ingest.paths import Located, ObjectResolver, PathResolver, Refused, printable, video_id_for

log = logging.getLogger(__name__)
STAGE = "ingest"


@dataclass
class Entry:
    """One input item as a reader found it: the path as given, its span (None: the whole file, no span)."""

    given: str
    item_id: str
    row: int | None = None  # 1-based manifest line / annotation index; None for directory listings
    order: int = 0  # position within the row (Panda-70M rows carry several spans)
    span: Span | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.row or 0, self.order)


def row_item_id(file_name: str, row: int, span: int | None = None) -> str:
    """The one key of an input row in failure rows, whichever stage fails it: `m.csv:7` (file and 1-based
    line), `m.csv:7.2` for the third span of a row that lists several (Panda-70M)."""
    return f"{file_name}:{row}" if span is None else f"{file_name}:{row}.{span}"


def failure(item_id: str, reason: str, detail: str, source: str = "") -> Failure:
    return Failure(item_id=item_id, stage=STAGE, reason=reason, detail=detail, source=printable(source))


def refused_failures(entry: Entry, refused: Refused) -> list[Failure]:
    """One failure per annotation sample the entry carries (each released sample is accounted for), else one."""
    ids = [s.id for s in entry.span.samples] if entry.span and entry.span.samples else [entry.item_id]
    return [failure(i, refused.reason, refused.detail, entry.given) for i in ids]


def locate(resolver: PathResolver | ObjectResolver, entry: Entry) -> Located | list[Failure]:
    found = resolver.locate(entry.given)
    return refused_failures(entry, found) if isinstance(found, Refused) else found


def _span_key(span: Span) -> tuple[float, float | None]:
    return (round(span.start_s, 6), None if span.end_s is None else round(span.end_s, 6))


def build_video(located: Located, entries: Iterable[Entry]) -> tuple[VideoRecord, list[Failure]]:
    """The video for one located source file: spans in row order, duplicates reported as failures.

    Annotation samples (LLaVA) on the same range are not duplicates: each sample is its own span.
    """
    # A file listed under its own name first, so another name for it (a symlink) is the duplicate.
    ordered = sorted(entries, key=lambda e: (e.sort_key, e.given != located.relpath))
    video = VideoRecord(id=video_id_for(located.relpath), source=located.source, relpath=located.relpath,
                        size_bytes=located.size_bytes, metadata=ordered[0].metadata if ordered else {})
    failures: list[Failure] = []
    seen: dict[tuple, Entry] = {}
    for entry in ordered:
        if entry.span is not None and entry.span.samples:
            video.spans.append(entry.span)
            continue
        key = _span_key(entry.span) if entry.span is not None else ("whole file",)
        first = seen.get(key)
        if first is not None:
            if entry.span is None and entry.row is None:  # a folder listing: a second name for one file
                failures.append(failure(entry.item_id, reasons.DUPLICATE_SOURCE,
                                        f"another name for {first.given}, ingested under that name", entry.given))
            else:
                what = "the whole video" if entry.span is None else f"span {key[0]}-{key[1]} s"
                failures.append(failure(entry.item_id, reasons.DUPLICATE_SPAN,
                                        f"{what} is already listed by row {first.row} ({first.item_id})",
                                        entry.given))
            failures[-1].video_id = video.id
            continue
        seen[key] = entry
        if entry.span is not None:
            video.spans.append(entry.span)
    return video, failures


def failure_result(f: Failure) -> VideoResult:
    """A failure row of the input dataset: a failed result with no video, carrying the failure."""
    return VideoResult(video_id=f.item_id, source=f.source, failures=[f], failed=True)


def video_result(video: VideoRecord, failures: list[Failure]) -> VideoResult:
    """A video row of the input dataset; its duplicate-span failures travel (and commit) with it."""
    return VideoResult(video_id=video.id, source=video.relpath, video=video, failures=list(failures))
