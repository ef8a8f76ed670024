"""A run directory: resolved config, manifest (status, counts, versions), logs, shards and failures."""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import yaml

from schemas.config import RunConfig
from schemas.saved_config import check_unchanged
from stages.ffmpeg_tools import ffmpeg_binary
from stages.storage import Storage

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
# Sections that only change how a run executes, not what it produces: they may differ on resume.
_EXECUTION_ONLY = frozenset({"ray", "name"})


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("hicom-data", "ray", "webdataset", "pyarrow", "duckdb", "pydantic"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        first = subprocess.run([ffmpeg_binary(), "-version"], capture_output=True, text=True, timeout=10)
        versions["ffmpeg"] = first.stdout.splitlines()[0] if first.stdout else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        versions["ffmpeg"] = "unknown"
    return versions


class RunDirectory:
    """A run on a local disk or an object store (through `Storage`); config and manifest written atomically."""

    def __init__(self, path: str | Path | Storage):
        self.storage = path if isinstance(path, Storage) else Storage.from_uri(path)
        self.path = self.storage.local_path() or self.storage.uri()

    def _write_json(self, rel: str, data: dict) -> None:
        self.storage.write_text(rel, json.dumps(data, indent=1, sort_keys=True))

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.storage.read_text(MANIFEST_FILE))
        except (OSError, ValueError):
            return {}

    def open(self, cfg: RunConfig) -> None:
        """Create or reopen the run; a reopened run must have been built with the same output config."""
        local = self.storage.local_path()
        if local is not None:
            (local / "logs").mkdir(parents=True, exist_ok=True)
        resolved = cfg.model_dump(mode="json")
        if self.storage.exists(CONFIG_FILE):
            check_unchanged(yaml.safe_load(self.storage.read_text(CONFIG_FILE)) or {}, resolved,
                            f"{self.path} was built with a different config", "resume with the same config or "
                            "choose a new --out", ignore=_EXECUTION_ONLY)
        self.storage.write_text(CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))
        manifest = self.read_manifest()
        manifest.update({"name": cfg.name, "status": "running", "started_at": time.time(),
                         "versions": _versions(), "runs": manifest.get("runs", 0) + 1})
        self._write_json(MANIFEST_FILE, manifest)

    def finish(self, counts: dict, status: str = "finished", deferred: list[str] = ()) -> dict:
        """Mark the run done: `finished`, or `incomplete` when some videos must be retried by a rerun
        (`deferred`: their ids, shown by the next build before it starts)."""
        manifest = self.read_manifest()
        manifest.update({"status": status, "finished_at": time.time(), "counts": counts,
                         "deferred_video_ids": sorted(deferred)})
        self._write_json(MANIFEST_FILE, manifest)
        return manifest
