"""Category selection: DuckDB over score parquet files, deterministic, every rejected video a failure row."""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import category_select
from schemas import reasons
from schemas.config import RunConfig
from schemas.recipe import CategoryConfig
from schemas.records import VideoRecord

SCORES = [("a1", "cooking", 0.9), ("a2", "cooking", 0.8), ("a3", "cooking", 0.7), ("b1", "dancing", 0.5),
          ("b2", "dancing", 0.6), ("c1", "gaming", 0.1)]


def _write_scores(run_dir, rows, name="scores-1"):
    folder = run_dir / category_select.SCORES_DIR / name
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist([{"video_id": v, "category": c, "category_score": s, "failures": "[]"}
                                  for v, c, s in rows])
    pq.write_table(table, folder / "part-0.parquet")


def test_top_n_per_category_by_similarity_plus_m_random_others(tmp_path):
    _write_scores(tmp_path, SCORES)
    cfg = CategoryConfig(sentences=["x"], per_category=1, random_others=1, seed=3)
    decisions = category_select.select(cfg, tmp_path, [v for v, _, _ in SCORES])
    kept = {v for v, d in decisions.items() if d[-1] == "by_similarity"}
    assert kept == {"a1", "b2", "c1"}
    assert sum(d[-1] == "random" for d in decisions.values()) == 1
    assert sum(d[-1] == "rejected" for d in decisions.values()) == 2
    assert category_select.select(cfg, tmp_path, [v for v, _, _ in SCORES]) == decisions  # same on a rerun
    only_some = category_select.select(cfg, tmp_path, ["a2", "a3"])  # restricted to the run's inputs
    assert set(only_some) == {"a2", "a3"} and only_some["a2"][-1] == "by_similarity"


def test_select_by_category_returns_failure_rows_for_rejected_and_unscored_videos(tmp_path):
    _write_scores(tmp_path, SCORES)
    failed = {"item_id": "z1", "stage": "probe", "reason": reasons.NOT_A_VIDEO, "detail": "", "source": "z1.mp4",
              "video_id": "z1"}
    pq.write_table(pa.Table.from_pylist([{"video_id": "z1", "category": None, "category_score": None,
                                          "failures": json.dumps([failed])}]),
                   tmp_path / category_select.SCORES_DIR / "scores-1" / "part-1.parquet")
    (tmp_path / category_select.SCORES_DIR / "scores-9.tmp").mkdir()  # a killed pass: removed
    cfg = RunConfig.model_validate({"recipe": {"categories": {"sentences": ["x"], "per_category": 1,
                                                              "random_others": 0}},
                                    "embedder": {"random_init": True}})
    videos = [VideoRecord(id=v, source=f"/x/{v}.mp4", relpath=f"{v}.mp4") for v, _, _ in SCORES + [("z1", 0, 0)]]
    keep, rejected = category_select.select_by_category(cfg, tmp_path, videos, videos)
    assert sorted(v.id for v in keep) == ["a1", "b2", "c1"]
    assert all(v.category and v.category_score is not None for v in keep)
    by_id = {r.video_id: [(f.stage, f.reason) for f in r.failures] for r in rejected}
    assert by_id == {"a2": [("category_select", reasons.CATEGORY_QUOTA_FULL)],
                     "a3": [("category_select", reasons.CATEGORY_QUOTA_FULL)],
                     "b1": [("category_select", reasons.CATEGORY_QUOTA_FULL)], "z1": [("probe", reasons.NOT_A_VIDEO)]}
    assert len(keep) + len(rejected) == len(videos)
    assert not (tmp_path / category_select.SCORES_DIR / "scores-9.tmp").exists()


def test_without_categories_selection_is_the_identity(tmp_path):
    videos = [VideoRecord(id="a", source="/x/a.mp4", relpath="a.mp4")]
    assert category_select.select_by_category(RunConfig(), tmp_path, videos, videos) == (videos, [])
