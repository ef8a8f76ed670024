"""The LLM client against a stub server on 127.0.0.1: retries, Retry-After per request, timeouts, rejected
endpoints, validation before caching, cache, concurrency, accounting, and the API key staying out of
everything it writes."""
from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import time

import pytest

from schemas.caption import EndpointConfig
from stages.llm import EndpointRejected, LLMClient, LLMError, ResponseCache, Usage, parse_retry_after, read_usage, \
    summary_line, write_usage
from tests.stub_openai import StubOpenAI

MSG = [{"role": "user", "content": "hello"}]


def msg(i) -> list[dict]:
    return [{"role": "user", "content": f"hello {i}"}]


@pytest.fixture()
def stub():
    with StubOpenAI() as server:
        yield server


def endpoint(stub, **kw) -> EndpointConfig:
    defaults = {"base_url": stub.base_url, "model": "stub-model", "timeout_s": 2.0, "backoff_base_s": 0.01,
                "backoff_max_s": 0.05, "max_retries": 4}
    return EndpointConfig(**{**defaults, **kw})


def run(coro):
    return asyncio.run(coro)


async def chat(client, messages=MSG, version="v1", **kw):
    try:
        return await client.chat(messages, prompt_version=version, **kw)
    finally:
        await client.aclose()


def test_ok_and_usage(stub):
    client = LLMClient(endpoint(stub, price_per_1k_prompt_tokens=1.0, price_per_1k_completion_tokens=2.0))
    result = run(chat(client))
    assert json.loads(result.text) == {"echo": "hello"}
    assert result.finish_reason == "stop" and not result.cached
    u = client.usage
    assert (u.requests, u.succeeded, u.retries, u.failed) == (1, 1, 0, 0)
    assert u.prompt_tokens == 1 and u.completion_tokens == 2
    assert u.cost == pytest.approx(1 / 1000 * 1.0 + 2 / 1000 * 2.0)


@pytest.mark.parametrize("mode", ["429", "500", "bad_body"])
def test_transient_errors_are_retried(stub, mode):
    stub.mode, stub.fail_times = mode, 2
    client = LLMClient(endpoint(stub))
    result = run(chat(client))
    assert json.loads(result.text)["echo"] == "hello"
    assert stub.total == 3 and client.usage.retries == 2 and client.usage.succeeded == 1


def test_retry_after_is_honoured(stub):
    stub.mode, stub.fail_times, stub.retry_after = "429", 1, 0.6
    client = LLMClient(endpoint(stub, backoff_base_s=0.0))
    started = time.monotonic()
    run(chat(client))
    assert time.monotonic() - started >= 0.6
    assert client.usage.errors["rate_limited"] == 1


def test_retry_after_pauses_that_request_only(stub):
    """One 429 with Retry-After: 2 holds its own request; the client's other requests go on."""
    stub.retry_after, stub.latency_s = 2.0, 0.05
    client = LLMClient(endpoint(stub, backoff_base_s=0.0, max_concurrency=4))
    done: dict[int, float] = {}

    async def one(i: int, started: float):
        text = f"hello {i} [[stub:429:1]]" if i == 0 else f"hello {i}"
        await client.chat([{"role": "user", "content": text}], prompt_version="v1")
        done[i] = time.monotonic() - started

    async def many():
        started = time.monotonic()
        try:
            # the 429 arrives first; the other requests are sent while it waits
            await asyncio.gather(one(0, started), *(one(i, started + 0) for i in range(1, 9)))
        finally:
            await client.aclose()

    run(many())
    assert done[0] >= 2.0  # the rate-limited request waited its Retry-After
    assert max(done[i] for i in range(1, 9)) < 1.0  # the others did not
    assert client.usage.errors == {"rate_limited": 1} and stub.total == 10


def test_retry_after_header_forms():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after({"retry-after": http_date}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_hang_past_timeout_is_retried(stub):
    stub.mode, stub.fail_times, stub.hang_s = "hang", 1, 3.0
    client = LLMClient(endpoint(stub, timeout_s=0.5))
    started = time.monotonic()
    result = run(chat(client))
    elapsed = time.monotonic() - started
    assert json.loads(result.text)["echo"] == "hello"
    assert 0.5 <= elapsed < 2.5
    assert client.usage.errors["timeout"] == 1


def test_gives_up_after_bounded_retries(stub):
    stub.mode = "500"
    client = LLMClient(endpoint(stub, max_retries=3))
    with pytest.raises(LLMError) as info:
        run(chat(client))
    assert info.value.kind == "server_error" and info.value.attempts == 4
    assert stub.total == 4 and client.usage.failed == 1 and client.usage.requests == 4


def test_client_errors_are_not_retried(stub):
    stub.mode = "400"
    client = LLMClient(endpoint(stub))
    with pytest.raises(LLMError) as info:
        run(chat(client))
    assert info.value.kind == "client_error" and stub.total == 1


@pytest.mark.parametrize("status", ["401", "403", "404"])
def test_rejected_endpoint_raises_and_sends_no_more(stub, status):
    stub.mode = status
    client = LLMClient(endpoint(stub, max_retries=5))

    async def twice():
        try:
            for i in range(2):
                with pytest.raises(EndpointRejected) as info:
                    await client.chat(msg(i), prompt_version="v1")
            return info.value
        finally:
            await client.aclose()

    exc = run(twice())
    assert stub.total == 1 and exc.status == int(status) and exc.base_url == stub.base_url
    assert f"HTTP {status}" in str(exc) and client.usage.errors == {f"http_{status}": 1}
    assert f"http_{status} 1" in summary_line("instruct", client.usage.to_dict())


def test_invalid_replies_are_retried_and_never_cached(stub, tmp_path):
    def validate(reply):
        if "echo" not in json.loads(reply.text) or stub.total < 3:
            raise ValueError("not yet")

    client = LLMClient(endpoint(stub), ResponseCache(tmp_path))
    result = run(chat(client, validate=validate))
    assert stub.total == 3 and client.usage.errors == {"invalid_reply": 2} and client.usage.succeeded == 1
    assert len(ResponseCache(tmp_path)) == 1 and not result.cached

    stub.mode = "malformed"
    bad = LLMClient(endpoint(stub, max_retries=1), ResponseCache(tmp_path))
    with pytest.raises(LLMError) as info:
        run(chat(bad, msg(1), validate=lambda r: json.loads(r.text)))
    assert info.value.kind == "bad_response" and info.value.reply.text.startswith("Sure!")
    assert len(ResponseCache(tmp_path)) == 1  # the malformed reply was not cached
    stub.mode = "ok"
    again = LLMClient(endpoint(stub), ResponseCache(tmp_path))
    run(chat(again, msg(1), validate=lambda r: json.loads(r.text)))
    assert again.usage.requests == 1 and again.usage.cache_hits == 0  # asked again, then cached
    assert len(ResponseCache(tmp_path)) == 2


def test_cache_makes_reruns_free(stub, tmp_path):
    first = LLMClient(endpoint(stub), ResponseCache(tmp_path))
    run(chat(first))
    assert stub.total == 1
    again = LLMClient(endpoint(stub), ResponseCache(tmp_path))  # a new process on resume
    result = run(chat(again))
    assert result.cached and stub.total == 1 and again.usage.cache_hits == 1 and again.usage.requests == 0
    other_version = LLMClient(endpoint(stub), ResponseCache(tmp_path))
    run(chat(other_version, version="v2"))  # a new prompt version is a new key
    assert stub.total == 2


def test_failures_are_not_cached(stub, tmp_path):
    stub.mode = "500"
    with pytest.raises(LLMError):
        run(chat(LLMClient(endpoint(stub, max_retries=0), ResponseCache(tmp_path))))
    stub.mode = "ok"
    result = run(chat(LLMClient(endpoint(stub), ResponseCache(tmp_path))))
    assert not result.cached and stub.total == 2


def test_concurrency_is_bounded(stub):
    stub.latency_s = 0.1
    client = LLMClient(endpoint(stub, max_concurrency=4))

    async def many():
        try:
            return await asyncio.gather(*(client.chat(msg(i), prompt_version="v1") for i in range(16)))
        finally:
            await client.aclose()

    results = run(many())
    assert len(results) == 16 and stub.total == 16
    assert stub.max_in_flight == 4


def test_identical_requests_in_flight_are_sent_once(stub):
    stub.latency_s = 0.2
    client = LLMClient(endpoint(stub))

    async def same():
        try:
            return await asyncio.gather(*(client.chat(MSG, prompt_version="v1") for _ in range(5)))
        finally:
            await client.aclose()

    results = run(same())
    assert stub.total == 1 and len({r.text for r in results}) == 1 and client.usage.deduplicated == 4


def test_api_key_comes_from_env_and_is_never_written(stub, tmp_path, monkeypatch, caplog):
    secret = "sk-test-5f2a9c0d1e-very-secret"
    monkeypatch.setenv("HICOM_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    stub.mode, stub.fail_times = "429", 1
    client = LLMClient(endpoint(stub, api_key_env="HICOM_TEST_KEY"), ResponseCache(tmp_path / "cache"))
    run(chat(client))
    assert f"Bearer {secret}" in stub.auth_headers  # it was sent...
    write_usage(tmp_path / "usage" / "u.json", {"instruct": client.usage})
    written = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert written and secret not in written  # ...and never stored
    assert secret not in caplog.text and secret not in repr(client)


def test_a_server_quoting_the_key_does_not_leak_it(stub, monkeypatch):
    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("HICOM_TEST_KEY", secret)
    stub.mode = "400"
    with pytest.raises(LLMError) as info:
        run(chat(LLMClient(endpoint(stub, api_key_env="HICOM_TEST_KEY"))))
    assert "incorrect API key" in str(info.value) and secret not in str(info.value)


def test_missing_key_env_fails_at_start(monkeypatch):
    monkeypatch.delenv("HICOM_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="HICOM_ABSENT_KEY"):
        LLMClient(EndpointConfig(api_key_env="HICOM_ABSENT_KEY"))


def test_config_refuses_a_key_in_place_of_a_name():
    with pytest.raises(ValueError):
        EndpointConfig(api_key_env="sk-abc/def+ghi")


def _write_keys(args):
    root, worker = args
    cache = ResponseCache(root)
    for i in range(200):
        cache.put(f"{i % 50:064x}", {"text": f"answer {i % 50}", "worker": 0})
        got = cache.get(f"{(i * 7) % 50:064x}")
        assert got is None or got["text"] == f"answer {(i * 7) % 50}"
    return worker


def test_cache_is_safe_with_several_processes(tmp_path):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        assert sorted(pool.map(_write_keys, [(str(tmp_path), w) for w in range(3)])) == [0, 1, 2]
    cache = ResponseCache(tmp_path)
    assert len(cache) == 50 and not list(tmp_path.rglob("*.tmp"))
    assert all(cache.get(f"{i:064x}")["text"] == f"answer {i}" for i in range(50))


def test_usage_totals(tmp_path):
    a, b = Usage(requests=2, prompt_tokens=10, cost=0.5), Usage(requests=3, completion_tokens=4)
    a.errors["timeout"] += 1
    write_usage(tmp_path / "x" / "a.json", {"instruct": a})
    write_usage(tmp_path / "x" / "b.json", {"instruct": b, "caption": b})
    totals = read_usage(tmp_path)
    assert totals["instruct"]["requests"] == 5 and totals["instruct"]["cost"] == 0.5
    assert totals["instruct"]["errors"] == {"timeout": 1} and totals["caption"]["requests"] == 3
    assert summary_line("instruct", totals["instruct"]).startswith("llm instruct: 5 requests")
