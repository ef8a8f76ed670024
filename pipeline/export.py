"""export-llava: the release's training JSON (plus clip files) from a run's shards.

The original HICom training code reads `[{"id", "video", "conversations"}]` with `video` relative to a clip
root; this writes that JSON and the clips under `<OUT>.clips/` (or a given folder) next to it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

log = logging.getLogger(__name__)


def committed_tars(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / "shards").glob("shard-*.tar"))


def export_llava(run_dir: str | Path, out_json: str | Path, clip_root: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Write the LLaVA JSON and one mp4 per clip; returns counts. Clips without an mp4 are skipped."""
    out_json = Path(out_json)
    clip_root = Path(clip_root) if clip_root else out_json.with_suffix("").with_name(out_json.stem + "_clips")
    entries, clips, skipped = [], 0, 0
    tars = committed_tars(run_dir)
    if not tars:
        raise FileNotFoundError(f"no committed shards under {run_dir}/shards")
    clip_root.mkdir(parents=True, exist_ok=True)
    dataset = wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False)
    for sample in tqdm(dataset, desc="export", unit="clip", disable=not progress):
        meta = json.loads(sample["json"])
        if "mp4" not in sample:
            skipped += 1
            continue
        relative = f"{meta['id']}.mp4"
        target = clip_root / relative
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(sample["mp4"])
        os.replace(tmp, target)
        clips += 1
        for s in meta["samples"]:
            entries.append({"id": s["id"], "video": relative, "conversations": s["conversations"]})
    tmp = out_json.with_name(out_json.name + ".tmp")
    tmp.write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, out_json)
    if skipped:
        log.warning("%d clips have no mp4 (clip.write_mp4 was off) and were not exported", skipped)
    return {"samples": len(entries), "clips": clips, "skipped_no_mp4": skipped, "clip_root": str(clip_root)}
