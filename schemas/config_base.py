"""The base of the build's config models: unknown keys are errors, a renamed key names its new name, and a
retired key (one an older version wrote into run directories) is ignored with a warning."""
from __future__ import annotations

import logging
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class RenamedKey(RuntimeError):
    """A config uses the old name of a renamed key. Not a ValueError on purpose: pydantic passes it through
    unwrapped, so the CLI prints its one line (and exits 2) instead of a validation report."""


class StrictConfig(BaseModel):
    """extra=forbid, plus `RENAMED` (old key -> the new key's full dotted path) for a one-line hint, and
    `RETIRED` (key -> why it no longer applies)."""

    model_config = ConfigDict(extra="forbid")
    RENAMED: ClassVar[dict[str, str]] = {}
    RETIRED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        for old, new in cls.RENAMED.items():
            if isinstance(data, dict) and old in data:
                section = new.rpartition(".")[0]
                raise RenamedKey(f"config key `{section + '.' if section else ''}{old}` was renamed `{new}`")
        retired = sorted(data.keys() & cls.RETIRED.keys()) if isinstance(data, dict) else []
        for key in retired:
            logging.getLogger(__name__).warning("config key `%s` is ignored: %s", key, cls.RETIRED[key])
        return {k: v for k, v in data.items() if k not in cls.RETIRED} if retired else data


def renamed_placeholder(identifiers: set[str], renamed: dict[str, str], where: str) -> None:
    """A prompt template that still uses a renamed `$placeholder` fails at config load, naming the new one."""
    for old in sorted(identifiers & renamed.keys()):
        raise RenamedKey(f"{where}: the placeholder ${old} was renamed ${renamed[old]}")
