"""Directory reader: every file with a video extension under a folder (recursive), local or object store.

The listing is split so it can run distributed: `top_level` names the folder's direct files and its
sub-folders (cheap, in the driver), and `walk` lists one sub-folder recursively (in a worker). Local
folders are walked without following directory symlinks; a symlinked *file* is listed and then resolved
(and refused if it leaves the data root).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow.fs as pafs

from schemas.config import InputConfig
from stages.ingest.entries import Entry
from stages.ingest.paths import printable
from stages.storage import Storage


def _has_ext(name: str, exts: set[str]) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in exts


def top_level(directory: str) -> tuple[list[str], list[str]]:
    """(files, sub-folders) directly in `directory`, as sorted names."""
    storage = Storage.from_uri(directory)
    if storage.is_local:
        files, folders = [], []
        with os.scandir(storage.fs_path()) as it:
            for item in it:
                (folders if item.is_dir(follow_symlinks=False) else files).append(item.name)
        return sorted(files), sorted(folders)
    infos = storage.fs.get_file_info(pafs.FileSelector(storage.fs_path(), recursive=False))
    start = len(storage.fs_path()) + 1
    files = sorted(i.path[start:] for i in infos if i.type == pafs.FileType.File)
    folders = sorted(i.path[start:] for i in infos if i.type == pafs.FileType.Directory)
    return files, folders


def walk(directory: str, folder: str) -> Iterator[str]:
    """Paths (relative to `directory`) of every file under sub-folder `folder`, sorted per level."""
    storage = Storage.from_uri(directory)
    if not storage.is_local:
        yield from storage.list(folder, recursive=True)
        return
    base = storage.fs_path()
    for dirpath, dirnames, filenames in os.walk(os.path.join(base, folder), followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.relpath(os.path.join(dirpath, name), base)


def entries(cfg: InputConfig, directory: str, names: Iterator[str]) -> Iterator[Entry]:
    """An entry per listed file with a video extension: local paths relative to the data root, object-store
    files as full URIs (checked against the data root when located)."""
    exts = {e.lower() for e in cfg.extensions}
    folder = Storage.from_uri(directory)
    root = Storage.from_uri(cfg.data_root or directory)
    for name in names:
        if not _has_ext(name, exts):
            continue
        if folder.is_local:
            given = os.path.relpath(os.path.join(folder.fs_path(), name), root.fs_path())
        else:
            given = folder.uri(name)
        yield Entry(given, printable(given))


def list_all(cfg: InputConfig, directory: str) -> Iterator[Entry]:
    """Every entry of the folder, listed in this process (tests, benches, small inputs)."""
    files, folders = top_level(directory)
    yield from entries(cfg, directory, iter(files))
    for folder in folders:
        yield from entries(cfg, directory, walk(directory, folder))
