"""What a client spent: HTTP attempts, cache hits, retries, errors by kind, tokens, cost, the last error.

Each actor writes its `Usage` per stage to a JSON file after every call; the driver sums the files of a run
(`read_usage`) and logs one summary line per stage (`summary_line`).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from stages.storage import write_atomic


@dataclass
class Usage:
    """Counters of one client (one stage in one actor)."""

    requests: int = 0  # HTTP requests sent (every attempt counts)
    succeeded: int = 0  # replies that passed validation and were paid for
    cache_hits: int = 0
    deduplicated: int = 0  # identical requests that waited on one in flight instead of sending
    retries: int = 0
    failed: int = 0  # calls that gave up (after retries or on a non-retryable error)
    errors: Counter = field(default_factory=Counter)  # attempt errors by kind (timeout, http_401, bad_response..)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    last_error: str = ""  # the latest error of a call that gave up (endpoint and status, never the key)

    def add_tokens(self, prompt: int, completion: int, price_in: float | None, price_out: float | None) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        if price_in is not None or price_out is not None:
            cost = prompt / 1000 * (price_in or 0.0) + completion / 1000 * (price_out or 0.0)
            self.cost = (self.cost or 0.0) + cost

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "errors"}, "errors": dict(self.errors)}

    @staticmethod
    def total(parts: list[dict]) -> dict:
        """Sum `to_dict()` outputs (several actors, several runs); `last_error` is the last non-empty one."""
        out = Usage().to_dict()
        for part in parts:
            for key, value in part.items():
                if key == "errors":
                    for kind, n in value.items():
                        out["errors"][kind] = out["errors"].get(kind, 0) + n
                elif key == "cost":
                    if value is not None:
                        out["cost"] = (out["cost"] or 0.0) + value
                elif key == "last_error":
                    out[key] = value or out[key]
                elif isinstance(value, (int, float)):
                    out[key] = out.get(key, 0) + value
        return out


def summary_line(stage: str, usage: dict) -> str:
    """One human line per stage: requests, cache, retries, failures and client errors by kind, tokens, cost."""
    errors = ", ".join(f"{k} {v}" for k, v in sorted(usage.get("errors", {}).items())) or "none"
    cost = f", cost {usage['cost']:.4f}" if usage.get("cost") is not None else ""
    return (f"llm {stage}: {usage.get('requests', 0)} requests ({usage.get('succeeded', 0)} ok, "
            f"{usage.get('failed', 0)} failed, {usage.get('retries', 0)} retries), {usage.get('cache_hits', 0)} "
            f"cache hits, errors: {errors}; tokens {usage.get('prompt_tokens', 0)} in / "
            f"{usage.get('completion_tokens', 0)} out{cost}")


def write_usage(path: str | Path, usages: dict[str, Usage]) -> None:
    """Write this process's usage per stage atomically (rewritten after each call)."""
    write_atomic(path, json.dumps({stage: u.to_dict() for stage, u in usages.items()}, indent=1))


def read_usage(folder: str | Path) -> dict[str, dict]:
    """Totals per stage over the usage files in `folder` (recursively)."""
    per_stage: dict[str, list[dict]] = {}
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for stage, usage in data.items():
            per_stage.setdefault(stage, []).append(usage)
    return {stage: Usage.total(parts) for stage, parts in per_stage.items()}
