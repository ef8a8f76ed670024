"""Category balance as a bounded dataset-wide pass (HICom-248K: up to 1,500 videos per category by
similarity, plus 10,000 random others).

1. Score: probe + `stages/categories.py` on Ray for every video not scored yet; each Ray task writes its own
   rows of `categories/scores-<stamp>/` (a folder renamed into place when complete, so a killed pass leaves
   only a `.tmp` folder that the next run removes). Only video ids travel back to the driver, never rows.
2. Select: one DuckDB query over all score files: each video belongs to its best category; the top
   `per_category` by similarity are kept, then `random_others` of the rest by a seeded hash (the same on
   every rerun); the others become committed failure rows `category_quota_full`.
3. Build: only the selected videos go through the stages, with their category and score in `videos`.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import duckdb

from schemas import reasons
from schemas.config import RunConfig
from schemas.recipe import CategoryConfig
from schemas.records import Failure, VideoRecord, VideoResult
from stages import categories, probe
from stages.ray_adapter import RayStage, from_row, to_row
from stages.storage import commit_dir

log = logging.getLogger(__name__)
SCORES_DIR = "categories"
STAGE = "category_select"
_MAX_BLOCKS = 1000

SELECT_SQL = """
WITH scores AS (
    SELECT video_id, any_value(category) AS category, any_value(category_score) AS score
    FROM read_parquet(?) WHERE category IS NOT NULL GROUP BY video_id),
cur AS (SELECT s.* FROM scores s JOIN wanted USING (video_id)),
ranked AS (SELECT *, row_number() OVER (PARTITION BY category ORDER BY score DESC, video_id) AS rank FROM cur),
rest AS (SELECT video_id, row_number() OVER (ORDER BY md5(? || video_id)) AS pick FROM ranked WHERE rank > ?)
SELECT r.video_id, r.category, r.score, r.rank, rest.pick,
       CASE WHEN r.rank <= ? THEN 'by_similarity' WHEN rest.pick <= ? THEN 'random' ELSE 'rejected' END
FROM ranked r LEFT JOIN rest USING (video_id)
"""


def _score_files(run_dir: Path) -> list[str]:
    return sorted(str(p) for p in (run_dir / SCORES_DIR).glob("scores-*/*.parquet")
                  if not p.parent.name.endswith(".tmp"))


def _score_row(row: dict) -> dict:
    result = from_row(row)
    video = result.video
    return {"video_id": result.video_id, "category": video.category, "category_score": video.category_score,
            "failures": json.dumps([f.model_dump() for f in result.failures])}


def score_videos(cfg: RunConfig, run_dir: Path, videos: list[VideoRecord]) -> None:
    """Probe and score `videos` on Ray; the workers write the score rows (parquet)."""
    import ray

    from stages.ray_runtime import init_ray, video_task_resources

    init_ray(cfg.ray.address, cfg.ray.num_cpus, run_dir / "logs" / "hicom.log")
    rows = [to_row(VideoResult(video_id=v.id, source=v.relpath, video=v)) for v in videos]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), _MAX_BLOCKS))
    ds = ds.map(RayStage(probe.STAGE, probe.apply, cfg.probe), **probe.RESOURCES, **video_task_resources())
    ds = ds.map(RayStage(categories.STAGE, categories.apply, cfg.recipe.categories, cfg.embedder),
                **categories.RESOURCES, **video_task_resources())
    final = run_dir / SCORES_DIR / f"scores-{time.strftime('%Y%m%d-%H%M%S')}-{len(videos)}"
    tmp = final.with_name(final.name + ".tmp")
    ds.map(_score_row).write_parquet(str(tmp))
    commit_dir(tmp, final)


def scored(run_dir: Path) -> dict[str, list[dict]]:
    """video id -> its scoring failures (empty when scored), over every committed score file."""
    files = _score_files(run_dir)
    if not files:
        return {}
    rows = duckdb.sql("SELECT video_id, any_value(failures) FROM read_parquet($files) GROUP BY video_id",
                      params={"files": files}).fetchall()
    return {video_id: json.loads(failures or "[]") for video_id, failures in rows}


def select(cfg: CategoryConfig, run_dir: Path, video_ids: list[str]) -> dict[str, tuple]:
    """video id -> (category, score, rank in category, random pick, decision) for the scored `video_ids`."""
    files = _score_files(run_dir)
    if not files:
        return {}
    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE wanted (video_id VARCHAR)")
    con.executemany("INSERT INTO wanted VALUES (?)", [(v,) for v in video_ids])
    rows = con.execute(SELECT_SQL, [files, str(cfg.seed), cfg.per_category, cfg.per_category,
                                    cfg.random_others]).fetchall()
    return {r[0]: r[1:] for r in rows}


def select_by_category(cfg: RunConfig, run_dir: Path, videos: list[VideoRecord],
                       pending: list[VideoRecord]) -> tuple[list[VideoRecord], list[VideoResult]]:
    """(videos to build, with category set; failed results to commit as they are). Identity without
    `recipe.categories`."""
    if cfg.recipe is None or cfg.recipe.categories is None or not pending:
        return pending, []
    cfg.embedder.require_model()  # a missing checkpoint fails the build at start, not per video
    run_dir = Path(run_dir)
    for leftover in (run_dir / SCORES_DIR).glob("scores-*.tmp"):
        shutil.rmtree(leftover)  # a killed scoring pass: its videos are scored again
    done = scored(run_dir)
    todo = [v for v in pending if v.id not in done]
    if todo:
        log.info("scoring %d videos against %d category sentences", len(todo), len(cfg.recipe.categories.sentences))
        score_videos(cfg, run_dir, todo)
        done = scored(run_dir)
    decisions = select(cfg.recipe.categories, run_dir, [v.id for v in videos])
    keep, rejected = [], []
    for video in pending:
        result = VideoResult(video_id=video.id, source=video.relpath, video=video)
        if video.id not in decisions:  # scoring failed: commit its failure rows (probe or decode reasons)
            result.failures = [Failure.model_validate(f) for f in done.get(video.id, [])]
            result.failed = True
            if not result.failures:
                result.fail_video(STAGE, reasons.NO_EMBEDDING, "the video was not scored")
            rejected.append(result)
            continue
        category, score, rank, pick, decision = decisions[video.id]
        video = video.model_copy(update={"category": category, "category_score": score})
        if decision == "rejected":
            result.video = video
            rejected.append(result.fail_video(
                STAGE, reasons.CATEGORY_QUOTA_FULL,
                f"rank {rank} in {category!r} (score {score:.4f}) > {cfg.recipe.categories.per_category}, "
                f"random pick {pick} > {cfg.recipe.categories.random_others}"))
        else:
            keep.append(video)
    log.info("category selection: %d of %d pending videos kept, %d failure rows", len(keep), len(pending),
             len(rejected))
    return keep, rejected
