import pickle

import pytest

from stages.storage import Storage, StorageError, commit_dir, redact
from tests.s3_server import ACCESS_KEY, SECRET_KEY, moto_endpoint, s3_bucket  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage.from_uri(tmp_path / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage.from_uri(f"s3://{bucket}/run")


def test_round_trip_listing_and_delete(storage):
    storage.write_text("shards/b.stats.json", "{}")
    storage.write_bytes("shards/a.tar", b"tar bytes")
    storage.write_bytes("failures/a.parquet", b"p")
    assert storage.list("shards") == ["shards/a.tar", "shards/b.stats.json"]
    assert storage.list("", recursive=True) == ["failures/a.parquet", "shards/a.tar", "shards/b.stats.json"]
    assert storage.list("nothing-here") == []
    assert storage.read_bytes("shards/a.tar") == b"tar bytes" and storage.size("shards/a.tar") == 9
    with storage.open_read("shards/b.stats.json") as f:
        assert f.read() == b"{}"
    assert storage.exists("shards/a.tar") and not storage.exists("shards/c.tar")
    storage.delete("shards/a.tar")
    storage.delete("shards/never-written.tar")  # missing is fine
    assert storage.list("shards") == ["shards/b.stats.json"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("shards/a.tar")


def test_object_is_invisible_until_clean_exit_and_absent_after_an_error(storage):
    with storage.open_write("shards/x.tar") as f:
        f.write(b"half")
        assert not storage.exists("shards/x.tar")
        assert all(p.endswith(".tmp") for p in storage.list("shards"))  # at most a local temp name
        f.write(b" and the rest")
    assert storage.read_bytes("shards/x.tar") == b"half and the rest"
    with pytest.raises(RuntimeError, match="killed mid-write"), storage.open_write("shards/y.tar") as f:
        f.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert storage.list("shards") == ["shards/x.tar"]  # no y.tar, no temp file left behind
    with pytest.raises(RuntimeError), storage.open_write("shards/x.tar") as f:
        f.write(b"replacement that fails")
        raise RuntimeError("boom")
    assert storage.read_bytes("shards/x.tar") == b"half and the rest"  # the committed object is untouched


def test_commit_dir_replaces_the_final_folder_whole(tmp_path):
    final = tmp_path / "step-00000002"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    tmp = tmp_path / "step-00000002.tmp"
    (tmp / "nested").mkdir(parents=True)
    (tmp / "weights.bin").write_bytes(b"new")
    (tmp / "nested" / "state.json").write_text("{}")
    assert commit_dir(tmp, final) == final
    assert not tmp.exists() and sorted(p.name for p in final.rglob("*")) == ["nested", "state.json", "weights.bin"]


def test_uri_local_path_and_pickling(storage, tmp_path):
    if storage.is_local:
        assert storage.uri("shards/a.tar") == str(tmp_path / "run" / "shards" / "a.tar")
        assert storage.local_path("shards") == tmp_path / "run" / "shards"
    else:
        assert storage.uri("shards/a.tar").startswith("s3://") and storage.uri().endswith("/run")
        assert storage.local_path("shards") is None
    storage.write_text("a.txt", "x")
    again = pickle.loads(pickle.dumps(storage))  # how a Storage travels to Ray workers
    assert again.read_text("a.txt") == "x" and again.uri() == storage.uri()
    assert storage.child("shards").uri("a.tar") == storage.uri("shards/a.tar")
    with pytest.raises(ValueError, match="under the root"):
        storage.fs_path("../outside")


def test_credentials_never_shown(s3_bucket):
    storage = Storage.from_uri(f"s3://{ACCESS_KEY}:{SECRET_KEY}@{s3_bucket}/run")
    storage.write_text("a.txt", "x")  # the URI's credentials work (the env holds the same ones)
    shown = [storage.uri(), storage.uri("a.txt"), repr(storage), repr(storage.child("shards"))]
    assert all(SECRET_KEY not in s and ACCESS_KEY not in s for s in shown), shown
    with pytest.raises((FileNotFoundError, StorageError)) as error:
        storage.read_bytes("missing.txt")
    assert SECRET_KEY not in str(error.value)
    assert redact(f"s3://{ACCESS_KEY}:{SECRET_KEY}@b/k and {SECRET_KEY}") == "s3://b/k and ***"


def test_unreachable_store_is_a_clean_storage_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage = Storage.from_uri("s3://no-such-bucket/run")
    with pytest.raises(StorageError) as error:
        storage.write_text("a.txt", "x")
    assert SECRET_KEY not in str(error.value)
