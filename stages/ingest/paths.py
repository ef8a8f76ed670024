"""Path safety: every input path is resolved under a declared data root, or refused with a reason.

Local roots resolve symlinks and check the result stays under the root; object-store roots (`s3://...`)
normalise the key and check it stays under the root prefix. A refused path is never opened.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from schemas import reasons
from stages.storage import Storage, is_uri


@dataclass(frozen=True)
class Located:
    """A usable source file: where it is, its path under the data root, and its size."""

    source: str  # absolute local path, or the object's URI without credentials
    relpath: str
    size_bytes: int


@dataclass(frozen=True)
class Refused:
    reason: str
    detail: str


def video_id_for(relpath: str) -> str:
    """Stable, tar-key-safe id: a readable slug of the file stem plus a hash of the relative path."""
    stem = Path(relpath).stem
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-")[:48] or "video"
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{slug}-{digest}"


def printable(path: str) -> str:
    """A UTF-8-safe rendering of any path (undecodable bytes escaped) for records and logs."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _bad_name(given: str) -> Refused | None:
    try:
        given.encode("utf-8")
    except UnicodeEncodeError:
        return Refused(reasons.BAD_NAME, f"file name is not valid UTF-8: {printable(given)!r}")
    return None


class PathResolver:
    """Resolves input paths under a local data root and says why a path is refused."""

    def __init__(self, data_root: str | Path):
        self.root = Path(data_root).resolve()

    def resolve(self, given: str) -> tuple[Path | None, str | None, str]:
        """Return (path, None, relpath) when usable, else (None, reason, detail)."""
        if is_uri(given) and not given.startswith("file://"):
            return None, reasons.UNSUPPORTED_URL, f"only files under the data root are read: {given!r}"
        if given.startswith("file://"):
            given = given[len("file://"):]
        if refused := _bad_name(given):
            return None, refused.reason, refused.detail
        candidate = Path(given)
        joined = candidate if candidate.is_absolute() else self.root / candidate
        try:
            resolved = joined.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # symlink loops raise here
            return None, reasons.UNREADABLE, f"cannot resolve {given!r}: {exc}"
        if not resolved.is_relative_to(self.root):
            reason = reasons.ABSOLUTE_PATH if candidate.is_absolute() else reasons.PATH_ESCAPES_ROOT
            return None, reason, f"{given!r} resolves outside the data root {str(self.root)!r}"
        if not resolved.exists():
            if joined.is_symlink():
                return None, reasons.UNREADABLE, f"broken or looping symlink: {given!r}"
            return None, reasons.MISSING_FILE, f"no such file: {given!r}"
        if not resolved.is_file():
            return None, reasons.NOT_A_FILE, f"not a regular file: {given!r}"
        if not os.access(resolved, os.R_OK):
            return None, reasons.UNREADABLE, f"permission denied: {given!r}"
        return resolved, None, resolved.relative_to(self.root).as_posix()

    def locate(self, given: str) -> Located | Refused:
        path, reason, info = self.resolve(given)
        if path is None:
            return Refused(reason, info)
        try:
            return Located(str(path), info, path.stat().st_size)
        except OSError as exc:
            return Refused(reasons.UNREADABLE, f"cannot stat {given!r}: {exc}")


class ObjectResolver:
    """Resolves keys under an object-store prefix (`s3://bucket/videos`): relative keys, or full URIs of the
    same store under that prefix. `..` that leaves the prefix and any other URL are refused."""

    def __init__(self, root: Storage):
        self.storage = root
        self.root_uri = root.uri()

    def locate(self, given: str) -> Located | Refused:
        if refused := _bad_name(given):
            return refused
        if is_uri(given):
            if not given.startswith(self.root_uri + "/"):
                return Refused(reasons.UNSUPPORTED_URL, f"only objects under {self.root_uri!r} are read: "
                                                        f"{printable(given)!r}")
            given = given[len(self.root_uri) + 1:]
        if given.startswith("/"):
            return Refused(reasons.ABSOLUTE_PATH, f"{given!r} is an absolute path; the data root is an "
                                                  "object store")
        rel = posixpath.normpath(given)
        if rel == ".." or rel.startswith("../") or rel == ".":
            return Refused(reasons.PATH_ESCAPES_ROOT, f"{given!r} resolves outside the data root {self.root_uri!r}")
        try:
            info = self.storage.fs.get_file_info(self.storage.fs_path(rel))
        except OSError as exc:
            return Refused(reasons.UNREADABLE, f"cannot stat {given!r}: {exc}")
        if info.type == pafs.FileType.NotFound:
            return Refused(reasons.MISSING_FILE, f"no such object: {given!r}")
        if info.type != pafs.FileType.File:
            return Refused(reasons.NOT_A_FILE, f"not an object: {given!r}")
        return Located(self.storage.uri(rel), rel, int(info.size))


def resolver_for(data_root: str) -> PathResolver | ObjectResolver:
    """The resolver for a data root given as a local path, `file://` or an object-store URI."""
    if is_uri(data_root) and not data_root.startswith("file://"):
        return ObjectResolver(Storage.from_uri(data_root))
    return PathResolver(data_root[len("file://"):] if data_root.startswith("file://") else data_root)
