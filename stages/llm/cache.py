"""The persistent response cache: one JSON file per (model, prompt version, input hash) key.

Only replies the caller validated are stored (see `LLMClient.chat(validate=...)`), so a malformed reply is
never served again: the next run asks once more. Files are written to a unique temp name and renamed, so
several processes (Ray actors, nodes on shared storage) can share the folder and readers never see half a
file; concurrent writers of one key write the same content.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from stages.storage import write_atomic

log = logging.getLogger(__name__)


def cache_key(model: str, prompt_version: str, payload: dict) -> str:
    """sha256 over (model, prompt version, hash of the request body): no key, no endpoint URL."""
    body = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    input_hash = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return hashlib.sha256(f"{model}\n{prompt_version}\n{input_hash}".encode("utf-8")).hexdigest()


class ResponseCache:
    """`root/<key[:2]>/<key>.json`, one validated reply per file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("unreadable cache entry %s: ignored", key)
            return None

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        write_atomic(path, json.dumps(value, ensure_ascii=False))

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json"))
