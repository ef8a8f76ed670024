"""Dataset stats with DuckDB: views `clips`, `pairs`, `videos`, `failures`, `shards` over a run's indexes.

The views read the committed parts' index parquet files at query time (nothing is copied into the database,
so a run with hundreds of millions of pair rows still answers). The connection is then sealed: on a local
run DuckDB may open only those files (`allowed_paths`), all other file access is off and the configuration is
locked. `allowed_paths` would also let a `COPY ... TO` overwrite an index file, so user SQL (`run_sql`) is
limited to read statements. On an object-store run (`s3://...`) the views are pyarrow datasets registered in
DuckDB (read through `stages.storage`), because DuckDB's own S3 reader (the httpfs extension) is downloaded
at first use and this pipeline runs offline; no DuckDB file access is allowed there at all.
"""
from __future__ import annotations

import logging
import posixpath
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.captioning import ANNOTATIONS_DIR
from pipeline.resume import as_storage, committed_stats
from schemas.index import CLIP_SCHEMA, FAILURE_SCHEMA, PAIR_SCHEMA, VIDEO_SCHEMA
from stages.shard import FAILURES_DIR, MARKER_SUFFIX, SHARDS_DIR
from stages.storage import Storage

log = logging.getLogger(__name__)
TABLES = {
    "clips": (SHARDS_DIR, ".clips.parquet", CLIP_SCHEMA),
    "pairs": (SHARDS_DIR, ".pairs.parquet", PAIR_SCHEMA),
    "videos": (SHARDS_DIR, ".videos.parquet", VIDEO_SCHEMA),
    "failures": (FAILURES_DIR, ".parquet", FAILURE_SCHEMA),
}
# One row per video: a video fanned out into clip batches has one row per committed batch (`batch_index`),
# merged here into its batch-0 row with the batches' clip and failure counts summed.
VIDEOS_VIEW = """
CREATE VIEW videos AS SELECT * EXCLUDE (batch_index) REPLACE (
    (sum(num_clips) OVER v)::INTEGER AS num_clips, (sum(num_failures) OVER v)::INTEGER AS num_failures,
    CASE WHEN bool_or(status = 'ok') OVER v THEN 'ok' ELSE 'failed' END AS status)
FROM video_rows WINDOW v AS (PARTITION BY video_id) QUALIFY coalesce(batch_index, 0) = 0
"""
# What user SQL may run: reads only (see the module docstring for why writes are refused by statement type).
READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


SHARD_SCHEMA = pa.schema([
    ("shard", pa.string()), ("num_samples", pa.int64()), ("num_videos", pa.int64()), ("num_failures", pa.int64()),
    ("num_pairs", pa.int64()), ("tar_bytes", pa.int64()), ("committed_at", pa.float64())])


def _table_sources(storage: Storage, annotations: str | None) -> dict:
    """Where each view's parquet files are. With an annotation version (`hicom caption`), `pairs` come from
    that version and its failures join the run's."""
    tables = dict(TABLES)
    if annotations:
        folder = f"{ANNOTATIONS_DIR}/{annotations}"
        if not storage.list(folder):
            raise FileNotFoundError(f"no annotation version {annotations!r} under {storage.uri(ANNOTATIONS_DIR)}")
        tables["pairs"] = (folder, ".pairs.parquet", PAIR_SCHEMA)
        tables["annotation_failures"] = (folder, ".failures.parquet", FAILURE_SCHEMA)
    return tables


def _part_of(rel: str) -> str:
    return posixpath.basename(rel).split(".")[0]


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _files(storage: Storage, folder: str, suffix: str, committed: set[str]) -> list[str]:
    return [rel for rel in storage.list(folder) if rel.endswith(suffix) and _part_of(rel) in committed
            and not rel.endswith(MARKER_SUFFIX)]


def _add_view(con: duckdb.DuckDBPyConnection, storage: Storage, name: str, files: list[str],
              schema: pa.Schema) -> list[str]:
    """Create view `name` over `files`; returns the local paths DuckDB itself must be allowed to open."""
    if not files:
        con.register(name, schema.empty_table())
        return []
    if storage.is_local:
        paths = [storage.fs_path(rel) for rel in files]
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_sql_list(paths)}, union_by_name=true)")
        return paths
    dataset = pads.dataset([storage.fs_path(rel) for rel in files], schema=schema, format="parquet",
                           filesystem=storage.fs)
    con.register(name, dataset)  # scanned lazily (projection and filters pushed down), never copied
    return []


def connect(run: str | Path | Storage, annotations: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views over the run's committed indexes, sealed against file access."""
    storage = as_storage(run)
    if not storage.exists(SHARDS_DIR):
        raise FileNotFoundError(f"{storage.uri()} is not a run directory (no {SHARDS_DIR}/)")
    parts = committed_stats(storage)
    committed = {p["shard"] for p in parts}
    if annotations:  # a part of an annotation version counts once its own stats file is written
        folder = f"{ANNOTATIONS_DIR}/{annotations}"
        committed &= {_part_of(rel) for rel in storage.list(folder) if rel.endswith(MARKER_SUFFIX)}
    con = duckdb.connect(":memory:")
    allowed: list[str] = []
    for table, (folder, suffix, schema) in _table_sources(storage, annotations).items():
        name = f"run_{table}" if annotations and table == "failures" else table
        name = "video_rows" if table == "videos" else name
        allowed += _add_view(con, storage, name, _files(storage, folder, suffix, committed), schema)
    con.execute(VIDEOS_VIEW)
    shards = [{"shard": p["shard"], "num_samples": p["num_samples"], "num_videos": p["num_videos"],
               "num_failures": p["num_failures"], "num_pairs": p.get("num_pairs", 0),
               "tar_bytes": p["tar_bytes"], "committed_at": p["committed_at"]} for p in parts]
    con.register("shards", pa.Table.from_pylist(shards, schema=SHARD_SCHEMA))
    if annotations:
        con.execute("CREATE VIEW failures AS SELECT * FROM run_failures "
                    "UNION ALL BY NAME SELECT * FROM annotation_failures")
    if allowed:
        con.execute(f"SET allowed_paths = {_sql_list(allowed)}")
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


class ReadOnlySql(duckdb.PermissionException):
    """User SQL that would do more than read the views."""


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """Run user SQL (read statements only) and format its last result as a table."""
    statements = con.extract_statements(sql)
    refused = [s.type.name for s in statements if s.type not in READ_STATEMENTS]
    if refused:
        raise ReadOnlySql(f"only SELECT/EXPLAIN queries run on a run's indexes (got {', '.join(refused)})")
    cursor = None
    for statement in statements:
        cursor = con.execute(statement)
    if cursor is None or cursor.description is None:
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
