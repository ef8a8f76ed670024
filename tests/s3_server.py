"""A real S3-compatible server (moto's, over HTTP on 127.0.0.1) for object-storage tests; never a mock object.

`moto_endpoint` starts `python -m moto.server` once per session; `s3_bucket` points the standard AWS
environment variables at it (what pyarrow, boto3 and Ray workers started afterwards read) and creates an
empty bucket per test. Import both fixtures into a test module to use them.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

ACCESS_KEY = "AKIAHICOMTESTKEY0001"
SECRET_KEY = "hicom-test-secret-0123456789abcdef"  # searched for in outputs: it must never appear


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a process needs to reach the test server (for subprocesses such as `hicom build`)."""
    return {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on the test server, with the AWS environment set for this test."""
    import boto3

    for key, value in s3_env(moto_endpoint).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    bucket = f"hicom-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket
