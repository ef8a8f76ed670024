"""`--set KEY=VALUE` overrides: one parser and one dotted-key apply for every command that takes them.

Values are YAML scalars (`--set clip.frames_per_clip=16` gives an int, `--set input.path=/x` a string), so a
command line override means exactly what the same line in a YAML config would.
"""
from __future__ import annotations

import copy

import yaml


class OverrideError(ValueError):
    """A malformed `--set` item; the CLI maps it (a ValueError) to exit code 2."""


def parse_set_options(items: list[str] | None) -> dict:
    """`["split.mode=fixed", "clip.frames_per_clip=16"]` -> `{"split.mode": "fixed", "clip.frames_per_clip": 16}`.

    Raises OverrideError naming the item when it has no `=` or an empty key.
    """
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OverrideError(f"--set expects KEY=VALUE (e.g. --set split.mode=fixed), got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise OverrideError(f"--set {key}: value {value!r} is not a YAML scalar: {exc}") from None
    return out


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """A copy of `data` with each dotted key (`clip.frames_per_clip`) set, creating missing sections.

    A dotted key that runs into a non-mapping value (`--set clip=3 --set clip.frames_per_clip=4`) is an error
    rather than a silent replacement.
    """
    result = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise OverrideError(f"--set {dotted}: {key!r} is {child!r}, not a section")
            node = child
        node[leaf] = value
    return result
