"""A run directory: resolved config, manifest (status, counts, versions), logs, shards and failures."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import yaml

from schemas.config import RunConfig
from stages.ffmpeg_tools import ffmpeg_binary

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
# Sections that only change how a run executes, not what it produces: they may differ on resume.
_EXECUTION_ONLY = {"ray", "name"}


class ConfigMismatch(ValueError):
    pass


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


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def open(self, cfg: RunConfig) -> None:
        """Create or reopen the run; a reopened run must have been built with the same output config."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "logs").mkdir(exist_ok=True)
        config_path = self.path / CONFIG_FILE
        resolved = cfg.model_dump(mode="json")
        if config_path.exists():
            previous = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
            changed = sorted(k for k in resolved if k not in _EXECUTION_ONLY and previous.get(k) != resolved[k])
            if changed:
                raise ConfigMismatch(
                    f"{self.path} was built with a different config (sections: {', '.join(changed)}); "
                    "resume with the same config or choose a new --out")
        config_path.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        manifest = self.read_manifest()
        manifest.update({"name": cfg.name, "status": "running", "started_at": time.time(),
                         "versions": _versions(), "runs": manifest.get("runs", 0) + 1})
        _write_json_atomic(self.manifest_path, manifest)

    def finish(self, counts: dict, status: str = "finished") -> dict:
        """Mark the run done: `finished`, or `incomplete` when some videos must be retried by a rerun."""
        manifest = self.read_manifest()
        manifest.update({"status": status, "finished_at": time.time(), "counts": counts})
        _write_json_atomic(self.manifest_path, manifest)
        return manifest
