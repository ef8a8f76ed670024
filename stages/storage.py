"""Storage: one small interface over a local directory or an object store (`s3://`, any pyarrow/fsspec URI).

A `Storage` is rooted at a folder (a run directory, an input prefix); every method takes a path relative to
that root, written with `/`. The one durability rule of the project lives here:

- an object written through `open_write` / `write_bytes` / `write_text` becomes visible *complete*, and only
  when the writing block exits cleanly; on an error nothing is left under the final name.
  Local: a temp name beside the target (`<name>.<random>.tmp`), fsync, rename, fsync of the folder.
  Object store: the bytes are spooled to a local temp file and uploaded on clean exit (an object store has no
  rename and pyarrow cannot abort an upload it has started, so nothing is uploaded until the data is whole).
- object stores have no rename, so a multi-object commit writes its data objects first and its marker last.

pyarrow.fs is the backend: it serves local paths and S3 natively, reads the standard AWS environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, ...), and its filesystems
plug straight into Ray Data, pyarrow datasets and DuckDB. Other fsspec URIs (gcsfs, adlfs, memory://) are
wrapped with pyarrow's `FSSpecHandler`. Credentials never appear in `uri()`, `repr()` or a re-raised error.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import pyarrow.fs as pafs

TEMP_SUFFIX = ".tmp"  # local in-progress writes end with this; resume deletes leftovers
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


class StorageError(OSError):
    """An I/O error on a storage backend, with credentials removed from its message."""


def is_uri(text: str) -> bool:
    """Whether `text` names a URI with a scheme (`s3://...`, `file://...`) rather than a plain path."""
    return bool(_SCHEME.match(str(text)))


def redact(text: str) -> str:
    """`text` without URI user-info (`s3://KEY:SECRET@bucket`) and without the values of AWS secret env vars."""
    text = _USERINFO.sub("", str(text))
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _public_uri(uri: str) -> str:
    """The URI as shown to people and written to files: no user-info, no query (options may hold keys)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


@contextlib.contextmanager
def _redacted_errors() -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise FileNotFoundError(redact(str(exc))) from None
    except (OSError, ValueError) as exc:
        raise StorageError(redact(str(exc))) from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    """A folder on a local disk or an object store; all paths are relative to it (`rel`, `/`-separated).

    Build one with `Storage.from_uri`. `fs` and `fs_path(rel)` give the pyarrow filesystem and the path in
    it, for Ray Data readers, pyarrow datasets and DuckDB.
    """

    def __init__(self, fs: pafs.FileSystem, root: str, public_uri: str, source: str):
        self.fs = fs
        self.root = root.rstrip("/") if root not in ("", "/") else root
        self._public = public_uri
        self._source = source  # what from_uri was given; only for pickling (may carry user-info)

    @classmethod
    def from_uri(cls, uri_or_path: str | os.PathLike) -> "Storage":
        """A local path, `file://` URI, `s3://bucket/prefix` or any pyarrow/fsspec URI.

        S3 endpoint, region and credentials come from the standard AWS environment unless the URI says
        otherwise (pyarrow's `?endpoint_override=...&region=...` query options also work).
        """
        text = os.fspath(uri_or_path)
        if not is_uri(text) or text.startswith("file://"):
            local = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser().resolve()
            return cls(pafs.LocalFileSystem(), local.as_posix(), local.as_posix(), text)
        with _redacted_errors():
            try:
                fs, root = pafs.FileSystem.from_uri(text)
            except ValueError:  # pyarrow's ArrowInvalid: a scheme it does not serve natively
                fs, root = cls._from_fsspec(text)
        return cls(fs, root, _public_uri(text), text)

    @staticmethod
    def _from_fsspec(uri: str) -> tuple[pafs.FileSystem, str]:
        """Schemes pyarrow does not know natively, through fsspec (which then must have the protocol)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root

    def __reduce__(self):  # Ray ships a Storage to workers: rebuild it there from the same URI
        return (Storage.from_uri, (self._source,))

    def __repr__(self) -> str:
        return f"Storage({self._public!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def fs_path(self, rel: str = "") -> str:
        """The path of `rel` inside `self.fs` (e.g. `bucket/run/shards/x.tar`)."""
        rel = rel.strip("/")
        if not rel:
            return self.root
        if rel.startswith("..") or "/../" in f"/{rel}/":
            raise ValueError(f"storage paths stay under the root: {rel!r}")
        return f"{self.root}/{rel}" if self.root != "/" else f"/{rel}"

    def uri(self, rel: str = "") -> str:
        """Where `rel` is, for people and records: a local absolute path, or the URI without credentials."""
        if self.is_local:
            return self.fs_path(rel)
        rel = rel.strip("/")
        return f"{self._public}/{rel}" if rel else self._public

    def local_path(self, rel: str = "") -> Path | None:
        """The local file system path of `rel`, or None on an object store."""
        return Path(self.fs_path(rel)) if self.is_local else None

    def child(self, rel: str) -> "Storage":
        """A Storage rooted at `rel` under this one."""
        sub = Storage(self.fs, self.fs_path(rel), self.uri(rel), self._source)
        sub._source = self._source if not rel.strip("/") else _join_source(self._source, rel)
        return sub

    # ---- reading -------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        with _redacted_errors():
            return self.fs.get_file_info(self.fs_path(rel)).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int:
        with _redacted_errors():
            info = self.fs.get_file_info(self.fs_path(rel))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"no such object: {self.uri(rel)}")
        return int(info.size)

    def list(self, prefix_rel: str = "", recursive: bool = False) -> list[str]:
        """Sorted rel paths of the files in folder `prefix_rel` (all levels when `recursive`); [] if none."""
        base = self.fs_path(prefix_rel)
        with _redacted_errors():
            infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=recursive))
        start = len(self.root.rstrip("/")) + 1
        return sorted(i.path[start:] for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, rel: str) -> bytes:
        with _redacted_errors(), self.fs.open_input_stream(self.fs_path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open_read(self, rel: str) -> BinaryIO:
        """A streaming binary reader (for large objects); close it after use."""
        with _redacted_errors():
            return self.fs.open_input_file(self.fs_path(rel))

    # ---- writing -------------------------------------------------------------------------------------
    def delete(self, rel: str) -> None:
        """Remove one object; a missing one is not an error."""
        with _redacted_errors(), contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.fs_path(rel))

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A binary file whose content appears under `rel` complete on clean exit, and not at all on error."""
        if self.is_local:
            with self._open_write_local(Path(self.fs_path(rel))) as f:
                yield f
            return
        with tempfile.NamedTemporaryFile(prefix="hicom-upload-", suffix=TEMP_SUFFIX) as spool:
            yield spool
            spool.flush()
            spool.seek(0)
            with _redacted_errors():
                self._upload(spool, rel)

    def _upload(self, spool: BinaryIO, rel: str) -> None:
        expected = os.fstat(spool.fileno()).st_size
        target = self.fs_path(rel)
        with self.fs.open_output_stream(target) as out:
            shutil.copyfileobj(spool, out, 8 << 20)
        written = self.fs.get_file_info(target).size
        if written != expected:  # cannot happen on a sound store; never leave a short object behind
            self.fs.delete_file(target)
            raise StorageError(f"upload of {self.uri(rel)} stored {written} of {expected} bytes")

    @staticmethod
    @contextlib.contextmanager
    def _open_write_local(target: Path) -> Iterator[BinaryIO]:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
        try:
            with tmp.open("wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_write(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))


def open_atomic(path: str | os.PathLike) -> contextlib.AbstractContextManager[BinaryIO]:
    """One local file by the one durability rule (temp name, fsync, rename, folder fsync): complete or absent.
    For files that are not under a run's `Storage` (caches, checkpoints, logs of state)."""
    return Storage._open_write_local(Path(path))


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    with open_atomic(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Commit a local folder written under the temp name `tmp` as `final`, by the same durability rule as
    `open_atomic`: every file and folder in it fsynced, rename (an existing `final` is replaced), parent
    fsynced. A folder named `final` is therefore always whole (checkpoints, score folders)."""
    tmp, final = Path(tmp), Path(final)
    for folder, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _join_source(source: str, rel: str) -> str:
    """`source` (a path or URI, possibly with a query) with `rel` appended to its path."""
    if not is_uri(source) or source.startswith("file://"):
        return f"{source.rstrip('/')}/{rel.strip('/')}"
    parts = urlsplit(source)
    return parts._replace(path=f"{parts.path.rstrip('/')}/{rel.strip('/')}").geturl()
