"""Dataset stats with DuckDB: tables `clips`, `pairs`, `videos`, `failures`, `shards` from a run's indexes.

The index parquet files are loaded into an in-memory database, then file access is switched off and the
configuration locked, so user SQL can read the tables but cannot read or write files (no COPY TO, no ATTACH).
"""
from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.captioning import ANNOTATIONS_DIR
from pipeline.resume import committed_stats
from stages.shard import CLIP_SCHEMA, FAILURE_SCHEMA, FAILURES_DIR, PAIR_SCHEMA, SHARDS_DIR, VIDEO_SCHEMA

log = logging.getLogger(__name__)
TABLES = {
    "clips": (SHARDS_DIR, "*.clips.parquet", CLIP_SCHEMA),
    "pairs": (SHARDS_DIR, "*.pairs.parquet", PAIR_SCHEMA),
    "videos": (SHARDS_DIR, "*.videos.parquet", VIDEO_SCHEMA),
    "failures": (FAILURES_DIR, "*.parquet", FAILURE_SCHEMA),
}


SHARD_SCHEMA = pa.schema([
    ("shard", pa.string()), ("num_samples", pa.int64()), ("num_videos", pa.int64()), ("num_failures", pa.int64()),
    ("num_pairs", pa.int64()), ("tar_bytes", pa.int64()), ("committed_at", pa.float64())])


def _create_from_arrow(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    con.register("_arrow_source", table)
    con.execute(f"CREATE TABLE {name} AS SELECT * FROM _arrow_source")
    con.unregister("_arrow_source")


def _table_sources(run_dir: Path, annotations: str | None) -> dict:
    """Where each table's parquet files are. With an annotation version (`hicom caption`), `pairs` come from
    that version and its failures join the run's."""
    tables = dict(TABLES)
    if annotations:
        folder = Path(ANNOTATIONS_DIR) / annotations
        if not (run_dir / folder).is_dir():
            raise FileNotFoundError(f"no annotation version {annotations!r} under {run_dir / ANNOTATIONS_DIR}")
        tables["pairs"] = (folder, "*.pairs.parquet", PAIR_SCHEMA)
        tables["annotation_failures"] = (folder, "*.failures.parquet", FAILURE_SCHEMA)
    return tables


def connect(run_dir: str | Path, annotations: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding the run's committed indexes, sealed against file access."""
    run_dir = Path(run_dir)
    if not (run_dir / SHARDS_DIR).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {SHARDS_DIR}/)")
    committed = {p["shard"] for p in committed_stats(run_dir)}
    if annotations:  # a part of an annotation version counts once its own stats file is written
        committed &= {p.name.split(".")[0] for p in (run_dir / ANNOTATIONS_DIR / annotations).glob("*.stats.json")}
    con = duckdb.connect(":memory:")
    for table, (folder, pattern, schema) in _table_sources(run_dir, annotations).items():
        files = sorted(str(p) for p in (run_dir / folder).glob(pattern)
                       if p.name.split(".")[0] in committed)
        if files:
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet(?, union_by_name=true)", [files])
        else:
            _create_from_arrow(con, table, schema.empty_table())
    shards = [{"shard": p["shard"], "num_samples": p["num_samples"], "num_videos": p["num_videos"],
               "num_failures": p["num_failures"], "num_pairs": p.get("num_pairs", 0),
               "tar_bytes": p["tar_bytes"], "committed_at": p["committed_at"]} for p in committed_stats(run_dir)]
    _create_from_arrow(con, "shards", pa.Table.from_pylist(shards, schema=SHARD_SCHEMA))
    if annotations:
        con.execute("INSERT INTO failures SELECT * FROM annotation_failures; DROP TABLE annotation_failures")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


REPORT = {
    "Totals": """
        SELECT (SELECT count(*) FROM videos) AS videos,
               (SELECT count(*) FROM videos WHERE status = 'ok') AS videos_ok,
               (SELECT count(*) FROM clips) AS clips,
               (SELECT count(*) FROM pairs) AS pairs,
               (SELECT count(*) FROM failures) AS failures,
               (SELECT count(*) FROM shards WHERE num_samples > 0) AS shards,
               round((SELECT coalesce(sum(duration_s), 0) FROM clips) / 3600, 3) AS clip_hours""",
    "Clip duration (s)": """
        SELECT count(*) AS clips, round(min(duration_s), 2) AS min, round(avg(duration_s), 2) AS mean,
               round(median(duration_s), 2) AS median, round(max(duration_s), 2) AS max FROM clips""",
    "Source resolution": """
        SELECT width || 'x' || height AS resolution, count(*) AS videos FROM videos
        WHERE width IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10""",
    "Pairs per clip": """
        SELECT num_pairs AS pairs_per_clip, count(*) AS clips FROM clips GROUP BY 1 ORDER BY 1""",
    "Pair kinds": """
        SELECT kind, source, count(*) AS pairs, round(avg(instruction_chars), 1) AS instr_chars,
               round(avg(answer_chars), 1) AS answer_chars FROM pairs GROUP BY 1, 2 ORDER BY 3 DESC""",
    "Failures by reason": """
        SELECT stage, reason, count(*) AS failures FROM failures GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2""",
}


def format_table(columns: list[str], rows: list[tuple]) -> str:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    cursor = con.execute(sql)
    if cursor.description is None:
        return "(no result)"
    return format_table([d[0] for d in cursor.description], cursor.fetchall())


def report(con: duckdb.DuckDBPyConnection) -> str:
    return "\n\n".join(f"== {title} ==\n{run_sql(con, sql)}" for title, sql in REPORT.items())


PLOTS = {
    "clip_duration_s": "SELECT duration_s FROM clips",
    "pairs_per_clip": "SELECT num_pairs FROM clips",
    "answer_chars": "SELECT answer_chars FROM pairs",
    "source_height_px": "SELECT height FROM videos WHERE height IS NOT NULL",
}


def plot(con: duckdb.DuckDBPyConnection, out_dir: str | Path) -> list[Path]:
    """PNG histograms of the main distributions; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, sql in PLOTS.items():
        values = [r[0] for r in con.execute(sql).fetchall() if r[0] is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        if values:
            ax.hist(values, bins=min(50, max(5, len(set(values)))), color="#3b6ea5")
        else:
            ax.text(0.5, 0.5, f"no data: no {name} values in this run", ha="center", transform=ax.transAxes)
            log.warning("plot %s: no data in this run", name)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # counts are whole numbers
        ax.set_title(f"{name} (n={len(values)})")
        ax.set_xlabel(name)
        ax.set_ylabel("count")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
