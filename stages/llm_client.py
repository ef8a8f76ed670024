"""An async client for OpenAI-compatible chat endpoints, shared by the caption and instruct stages.

- bounded concurrency per endpoint (a semaphore per client; one client per actor),
- retries with exponential backoff and full jitter on timeouts, connection errors, 429 and 5xx; a server's
  Retry-After (or retry-after-ms) holds every request of the client until it has passed,
- a per-request deadline (the `openai` package's own retries are off: `max_retries=0`),
- a persistent response cache keyed by (model, prompt version, input hash): one file per key, written
  atomically, so several processes (Ray actors, nodes on shared storage) can share it and a rerun or resume
  never pays twice; identical requests in flight at once are sent once,
- token, request and cost accounting per client, written to JSON files that a run sums up.
The API key is read from the env var the config names and is never logged, cached or stored.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.caption import EndpointConfig

log = logging.getLogger(__name__)
NO_KEY = "no-key"  # sent to local servers that want no key (the openai package requires a value)
_KEY_LIKE = re.compile(r"\b(?:sk|pk|key|api[_-]?key)[-_][A-Za-z0-9*_\-]{6,}|Bearer\s+\S+", re.IGNORECASE)


class LLMError(Exception):
    """A request that failed for good: `kind` is timeout, rate_limited, server_error, client_error,
    connection or bad_response; `detail` never contains the key."""

    def __init__(self, kind: str, detail: str, attempts: int = 1):
        super().__init__(f"{kind}: {detail} (after {attempts} attempt(s))")
        self.kind = kind
        self.detail = detail
        self.attempts = attempts

    @property
    def transient(self) -> bool:
        """The endpoint was away or overloaded (worth retrying later), not a refusal of this request."""
        return self.kind != "client_error"


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str, retry_after_s: float | None = None):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retry_after_s = retry_after_s


@dataclass
class ChatResult:
    """One completed chat request (from the endpoint or the cache)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    cached: bool = False
    key: str = ""


@dataclass
class Usage:
    """What a client spent: HTTP attempts, cache hits, retries, failures by kind, tokens and cost."""

    requests: int = 0  # HTTP requests sent (every attempt counts)
    succeeded: int = 0  # requests answered 200 and paid for
    cache_hits: int = 0
    deduplicated: int = 0  # identical requests that waited on one in flight instead of sending
    retries: int = 0
    failed: int = 0  # calls that gave up (after retries or on a non-retryable error)
    errors: Counter = field(default_factory=Counter)  # attempt errors by kind
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "errors"}, "errors": dict(self.errors)}

    @staticmethod
    def total(parts: list[dict]) -> dict:
        """Sum `to_dict()` outputs (several actors, several stages)."""
        out = Usage().to_dict()
        for part in parts:
            for key, value in part.items():
                if key == "errors":
                    for kind, n in value.items():
                        out["errors"][kind] = out["errors"].get(kind, 0) + n
                elif key == "cost":
                    if value is not None:
                        out["cost"] = (out["cost"] or 0.0) + value
                elif isinstance(value, (int, float)):
                    out[key] = out.get(key, 0) + value
        return out


def cache_key(model: str, prompt_version: str, payload: dict) -> str:
    """sha256 over (model, prompt version, hash of the request body): no key, no endpoint URL."""
    body = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    input_hash = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return hashlib.sha256(f"{model}\n{prompt_version}\n{input_hash}".encode("utf-8")).hexdigest()


class ResponseCache:
    """One JSON file per key under `root/<key[:2]>/`. Written to a unique temp name then renamed, so
    readers never see half a file and concurrent writers of the same key are harmless (same content)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("unreadable cache entry %s: ignored", key)
            return None

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json"))


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, `Retry-After: <seconds>` or `Retry-After: <HTTP date>`."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


def resolve_api_key(endpoint: EndpointConfig) -> str:
    """The key from the named env var; a named but unset var is a config error (fails at start)."""
    if endpoint.api_key_env is None:
        return NO_KEY
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ValueError(f"environment variable {endpoint.api_key_env} (endpoint api_key_env) is not set")
    return key


class LLMClient:
    """Chat completions against one endpoint with retries, a shared cache and accounting.

    Create one per process (actor); use it from one event loop (see `SyncRunner` for sync callers).
    """

    def __init__(self, endpoint: EndpointConfig, cache: ResponseCache | None = None, *,
                 rng: random.Random | None = None, openai_client: Any = None):
        self.endpoint = endpoint
        self.cache = cache
        self.usage = Usage()
        self._rng = rng or random.Random()
        self._api_key = resolve_api_key(endpoint)
        self._client = openai_client
        self._semaphore: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self._not_before = 0.0  # monotonic time before which no request is sent (Retry-After)

    def __repr__(self) -> str:  # the key stays out of reprs and logs
        return f"LLMClient(base_url={self.endpoint.base_url!r}, model={self.endpoint.model!r})"

    def _openai(self):
        if self._client is None:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(base_url=self.endpoint.base_url, api_key=self._api_key, max_retries=0,
                                       timeout=self.endpoint.timeout_s)
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.endpoint.max_concurrency)
        return self._client

    def payload(self, messages: list[dict], *, response_format: dict | None = None,
                max_tokens: int | None = None, temperature: float | None = None) -> dict:
        """The request body (what the cache key hashes)."""
        body = {"model": self.endpoint.model, "messages": messages,
                "temperature": self.endpoint.temperature if temperature is None else temperature,
                "max_tokens": max_tokens or self.endpoint.max_tokens}
        if response_format is not None:
            body["response_format"] = response_format
        return body

    async def chat(self, messages: list[dict], *, prompt_version: str, response_format: dict | None = None,
                   max_tokens: int | None = None, temperature: float | None = None) -> ChatResult:
        """One chat completion: from the cache when this (model, prompt version, input) was paid for."""
        body = self.payload(messages, response_format=response_format, max_tokens=max_tokens,
                            temperature=temperature)
        key = cache_key(self.endpoint.model, prompt_version, body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.cache_hits += 1
                return ChatResult(**{**hit, "cached": True, "key": key})
        if key in self._inflight:  # the same request is already on its way: share its answer
            self.usage.deduplicated += 1
            result = await asyncio.shield(self._inflight[key])
            return ChatResult(**{**result.__dict__, "cached": True})
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._send_with_retries(body, key)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) get it; no "never retrieved" warning
            raise
        finally:
            del self._inflight[key]

    async def _send_with_retries(self, body: dict, key: str) -> ChatResult:
        client = self._openai()
        attempt = 0
        while True:
            wait = self._not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                async with self._semaphore:
                    self.usage.requests += 1
                    result = await self._send_once(client, body)
            except _Retryable as exc:
                self.usage.errors[exc.kind] += 1
                if attempt >= self.endpoint.max_retries:
                    self.usage.failed += 1
                    raise LLMError(exc.kind, exc.detail, attempt + 1) from None
                delay = self._backoff(attempt)
                if exc.retry_after_s is not None:
                    hold = min(exc.retry_after_s, self.endpoint.max_retry_after_s)
                    self._not_before = max(self._not_before, time.monotonic() + hold)
                    delay = max(delay, hold)
                log.debug("retrying %s in %.2fs (attempt %d): %s", self.endpoint.model, delay, attempt + 1,
                          exc.detail)
                attempt += 1
                self.usage.retries += 1
                await asyncio.sleep(delay)
                continue
            except LLMError:
                self.usage.failed += 1
                raise
            result.key = key
            self.usage.succeeded += 1
            self.usage.prompt_tokens += result.prompt_tokens
            self.usage.completion_tokens += result.completion_tokens
            self._add_cost(result)
            if self.cache is not None:
                self.cache.put(key, {k: v for k, v in result.__dict__.items() if k not in ("cached", "key")})
            return result

    def _redact(self, text: str) -> str:
        """Server messages may quote the key (OpenAI's 401 shows a masked one): never let it into records."""
        if self._api_key != NO_KEY:
            text = text.replace(self._api_key, "[key]")
        return _KEY_LIKE.sub("[key]", text)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.endpoint.backoff_max_s, self.endpoint.backoff_base_s * (2 ** attempt))
        return self._rng.uniform(0, ceiling)  # full jitter: retries of many clients spread out

    def _add_cost(self, result: ChatResult) -> None:
        p_in, p_out = self.endpoint.price_per_1k_prompt_tokens, self.endpoint.price_per_1k_completion_tokens
        if p_in is None and p_out is None:
            return
        cost = result.prompt_tokens / 1000 * (p_in or 0.0) + result.completion_tokens / 1000 * (p_out or 0.0)
        self.usage.cost = (self.usage.cost or 0.0) + cost

    async def _send_once(self, client, body: dict) -> ChatResult:
        import openai

        try:
            # `post` with cast_to=str is the openai client's documented raw call: the same auth, timeouts and
            # error types, without its typed request transform (most of its CPU per request); any body field
            # an endpoint understands (llama.cpp's response_format.schema) goes through as is.
            text = await asyncio.wait_for(client.post("/chat/completions", cast_to=str, body=body),
                                          self.endpoint.timeout_s)
            response = json.loads(text)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise _Retryable("timeout", f"no answer within {self.endpoint.timeout_s:g}s") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            retry_after = parse_retry_after(getattr(exc.response, "headers", None))
            if status == 429:
                raise _Retryable("rate_limited", "HTTP 429", retry_after) from None
            if status >= 500 or status in (408, 409):
                raise _Retryable("server_error", f"HTTP {status}", retry_after) from None
            raise LLMError("client_error", f"HTTP {status}: {self._redact(_short(exc.message))}") from None
        except openai.APIConnectionError as exc:
            raise _Retryable("connection", type(exc).__name__) from None
        except (openai.APIError, ValueError) as exc:  # an unparseable body (JSONDecodeError is a ValueError)
            raise _Retryable("bad_response", f"{type(exc).__name__}: {_short(str(exc))}") from None
        try:
            choice = response["choices"][0]
            content = (choice.get("message") or {}).get("content") or ""
        except (TypeError, KeyError, IndexError, AttributeError):
            raise _Retryable("bad_response", f"no choices in the response: {_short(str(response))}") from None
        usage = response.get("usage") or {}
        return ChatResult(text=content if isinstance(content, str) else json.dumps(content),
                          finish_reason=choice.get("finish_reason"),
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0),
                          model=str(response.get("model") or self.endpoint.model))

    async def aclose(self) -> None:
        if self._client is not None and hasattr(self._client, "close"):
            await self._client.close()
            self._client = None
            self._semaphore = None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class SyncRunner:
    """An event loop in a daemon thread, so sync code (Ray actors, `apply`) can run coroutines on one
    long-lived loop (the HTTP connection pool and the semaphore live on it)."""

    def __init__(self):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-client-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()


def write_usage(path: str | Path, usages: dict[str, Usage]) -> None:
    """Write this process's usage per stage atomically (rewritten after each batch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps({stage: u.to_dict() for stage, u in usages.items()}, indent=1), encoding="utf-8")
    os.replace(tmp, path)


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
