"""export-llava: the release's training JSON (plus clip files) from a run's shards.

The original HICom training code reads `[{"id", "video", "conversations"}]` with `video` relative to a clip
root; this writes that JSON and the clips under `<OUT>_clips/` (or a given folder) next to it. The run, the
JSON and the clip folder may each be local or on an object store (`s3://...`); tars are streamed through
`stages.storage`, and every file is written with its atomic-write rule. An export that fails partway leaves
nothing visible: the JSON is written last, and the clips it wrote (and the local folders it made) are removed.
"""
from __future__ import annotations

import json
import logging
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.resume import as_storage, committed_tars
from stages.shard import SHARDS_DIR
from stages.storage import Storage, is_uri

log = logging.getLogger(__name__)


def iter_samples(run: Storage, tars: list[str]) -> Iterator[dict]:
    """WebDataset samples of `tars` (paths or URIs of committed tars of `run`), streamed in order."""
    def streams():
        for tar in tars:
            rel = f"{SHARDS_DIR}/{posixpath.basename(tar)}"
            with run.open_read(rel) as stream:
                yield {"url": run.uri(rel), "stream": stream}

    return group_by_keys(tar_file_expander(streams()))


def _split(path: str | Path) -> tuple[Storage, str]:
    """(storage of the folder, file name) of a local path or URI."""
    text = str(path)
    folder, name = posixpath.split(text) if is_uri(text) else (str(Path(text).parent), Path(text).name)
    return Storage.from_uri(folder), name


def _new_folder(storage: Storage) -> Path | None:
    """The topmost local folder of `storage` that does not exist yet (what writing into it would create)."""
    local = storage.local_path()
    if local is None:
        return None
    return next((p for p in reversed([local, *local.parents]) if not p.exists()), None)


def export_llava(run_dir: str | Path | Storage, out_json: str | Path, clip_root: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Write the LLaVA JSON and one mp4 per clip; returns counts. Clips without an mp4 are skipped.
    Raises RuntimeError (one line) if the export fails partway, after removing what it wrote."""
    run = as_storage(run_dir)
    json_dir, json_name = _split(out_json)
    if clip_root is None:
        clip_root = json_dir.uri(Path(json_name).stem + "_clips")
    clips_dir = Storage.from_uri(clip_root)
    tars = committed_tars(run)
    if not tars:
        raise FileNotFoundError(f"no committed shards under {run.uri(SHARDS_DIR)}")
    created = {p for p in (_new_folder(clips_dir), _new_folder(json_dir)) if p is not None}
    before = set(clips_dir.list())  # an earlier export's clips: rewritten with the same bytes, never removed
    written: list[str] = []
    try:
        counts = _export(run, tars, json_dir, json_name, clips_dir, written, progress)
    except BaseException as exc:
        for relative in written:
            if relative not in before:
                clips_dir.delete(relative)
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        if not isinstance(exc, Exception):  # Ctrl-C: cleaned up, then as it was
            raise
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise RuntimeError(f"export-llava stopped after {len(written)} clips ({type(exc).__name__}: {detail}); "
                           f"the clips it wrote are removed and {json_dir.uri(json_name)} was not written: fix "
                           "the cause and run it again") from exc
    if counts["skipped_no_mp4"]:
        log.warning("%d clips have no mp4 (clip.write_mp4 was off) and were not exported", counts["skipped_no_mp4"])
    return counts


def _export(run: Storage, tars: list[str], json_dir: Storage, json_name: str, clips_dir: Storage,
            written: list[str], progress: bool) -> dict:
    """The export itself; `written` collects each clip file as it is written, for the caller's clean-up."""
    entries, skipped = [], 0
    for sample in tqdm(iter_samples(run, tars), desc="export", unit="clip", disable=not progress):
        meta = json.loads(sample["json"])
        if "mp4" not in sample:
            skipped += 1
            continue
        relative = f"{meta['id']}.mp4"
        clips_dir.write_bytes(relative, sample["mp4"])
        written.append(relative)
        for s in meta["samples"]:
            entries.append({"id": s["id"], "video": relative, "conversations": s["conversations"]})
    json_dir.write_text(json_name, json.dumps(entries, ensure_ascii=False, indent=1))  # last: the export's marker
    return {"samples": len(entries), "clips": len(written), "skipped_no_mp4": skipped, "clip_root": clips_dir.uri()}
