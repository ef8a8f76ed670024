"""The one check that a resumed run (build, annotation version, training checkpoint) still has the config it
was started with: what it produces must not change halfway."""
from __future__ import annotations


class ConfigMismatch(ValueError):
    """A run is resumed with a config that differs from the one saved with it (the CLI exits 2)."""


def _shown(key: str, saved, current) -> str:
    """`seed (1 -> 2)`; a key alone when its values are too long to read (a whole config section)."""
    values = f"{saved!r} -> {current!r}"
    return f"{key} ({values})" if len(values) <= 120 else key


def check_unchanged(saved: dict, current: dict, made: str, hint: str, ignore: frozenset[str] = frozenset()) -> None:
    """Raise ConfigMismatch naming every key of `current` (not in `ignore`) whose saved value differs.

    Args:
        saved: the config (or settings) saved when the run started; keys it lacks count as changed.
        current: the config now; only its keys are compared.
        made: what was saved, as the message's subject (`runs/x was built with a different config`).
        hint: what to do instead (`resume with the same config or choose a new --out`).
    """
    changed = [_shown(k, saved.get(k), v) for k, v in sorted(current.items())
               if k not in ignore and saved.get(k) != v]
    if changed:
        raise ConfigMismatch(f"{made} ({', '.join(changed)}); {hint}")
