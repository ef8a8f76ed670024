"""Ingest: the input config -> video records (plus failure records), from a directory, a manifest or a
LLaVA annotation file, on local disk or an object store.

- `input_dataset(cfg)` is the build's entry point: a `ray.data.Dataset` read and grouped by Ray workers
  (nothing materialised in the driver); `read_all(cfg)` does the same work in this process (tests, benches).
- One module per job: `paths` (path safety), `directory` / `manifest` / `llava` (one reader per input kind),
  `entries` (rows -> videos, duplicate spans), `plan` (what the config names), `source` (local copy + sha256
  in the worker), `dataset` (the Ray reading).
"""
from __future__ import annotations

from stages.ingest.dataset import input_dataset
from stages.ingest.local import IngestResult, ingest, ingest_directory, ingest_llava, ingest_manifest, read_all
from stages.ingest.paths import PathResolver, printable, video_id_for
from stages.ingest.plan import detect_kind, remote_input
from stages.ingest.source import local_source, run_local, sha256_file

__all__ = ["IngestResult", "PathResolver", "detect_kind", "ingest", "ingest_directory", "ingest_llava",
           "ingest_manifest", "input_dataset", "local_source", "printable", "read_all", "remote_input", "run_local",
           "sha256_file", "video_id_for"]
