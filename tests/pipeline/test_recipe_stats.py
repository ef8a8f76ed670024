"""The recipe section's figures on tables built in memory, and a LLaVA file's figures."""
import json

import duckdb
import pyarrow as pa

from pipeline.recipe_stats import llava_figures, recipe_report, run_figures
from stages.shard import CLIP_SCHEMA, FAILURE_SCHEMA, PAIR_SCHEMA, VIDEO_SCHEMA


def _con(clips, pairs, videos, failures):
    con = duckdb.connect(":memory:")
    for name, rows, schema in (("clips", clips, CLIP_SCHEMA), ("pairs", pairs, PAIR_SCHEMA),
                               ("videos", videos, VIDEO_SCHEMA), ("failures", failures, FAILURE_SCHEMA)):
        con.register("t", pa.Table.from_pylist(rows, schema=schema))
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM t")
        con.unregister("t")
    return con


def test_run_figures_lengths_pairs_categories_and_drop_shares():
    clips = [{"clip_id": f"c{i}", "duration_s": d} for i, d in enumerate([6.0, 25.0, 100.0])]
    pairs = [{"clip_id": "c0", "instruction": "Describe the red car.", "answer": "The car is red and shiny."}] * 6
    videos = [{"video_id": "v0", "status": "ok", "category": "A video about cooking activity."},
              {"video_id": "v1", "status": "failed", "category": "A video about cooking activity."}]
    failures = [{"item_id": "x", "stage": "length", "reason": "too_short"},
                {"item_id": "p", "stage": "filter", "reason": "invalid_content"},
                {"item_id": "p2", "stage": "filter", "reason": "invalid_content"}]
    figures = run_figures(_con(clips, pairs, videos, failures))
    assert figures["pairs_per_clip"] == 2.0 and round(figures["clip_mean_s"], 2) == 43.67
    assert figures["length_bins"]["5-10 s"] == 1 and figures["length_bins"]["20-30 s"] == 1
    assert figures["length_bins"]["60-120 s"] == 1 and figures["instruction_words"] == 4
    assert figures["categories"] == [("A video about cooking activity.", 1, 2)]
    assert figures["drops"] == [("filter", "invalid_content", 2, "25.0 %"), ("length", "too_short", 1, "25.0 %")]


def test_llava_figures_and_the_compare_column(tmp_path):
    path = tmp_path / "release.json"
    turns = [{"from": "human", "value": "<video>\nDescribe the dog."}, {"from": "gpt", "value": "A brown dog runs."},
             {"from": "human", "value": "Describe the man."}, {"from": "gpt", "value": "He wears a hat."}]
    path.write_text(json.dumps([{"id": "1", "video": "a.mp4", "conversations": turns},
                                {"id": "2", "video": "b.mp4", "conversations": turns[:2]}]))
    figures = llava_figures(path)
    assert (figures["clips"], figures["pairs"], figures["pairs_per_clip"]) == (2, 3, 1.5)
    assert figures["instruction_words"] == 3 and figures["answer_words"] == 4
    report = recipe_report(_con([], [], [], []), path)
    assert "release.json" in report and "1.50" in report and "25.67" in report
