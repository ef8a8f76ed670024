"""`LLMClient`: chat completions against one OpenAI-compatible endpoint, for the caption and instruct stages.

- bounded concurrency (a semaphore per client; one client per actor and stage),
- retries with tenacity (`retry.py`), each request on its own schedule (Retry-After included),
- replies checked by the caller's `validate` before they count: an invalid reply is retried like a
  transient error and never cached, so a rerun asks again,
- a persistent cache of valid replies (`cache.py`); identical requests in flight at once are sent once,
- the first 401/403/404 stops the client: later calls raise the same `EndpointRejected` without sending,
- accounting (`accounting.py`). The API key comes from the env var the config names; it is never logged,
  cached or stored.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from schemas.caption import EndpointConfig
from stages.llm.accounting import Usage
from stages.llm.cache import ResponseCache, cache_key
from stages.llm.retry import call_with_retries
from stages.llm.transport import NO_KEY, AttemptError, ChatResult, EndpointRejected, LLMError, request_args, send

Validator = Callable[[ChatResult], None]  # raises ValueError(detail) when a reply is not usable


def resolve_api_key(endpoint: EndpointConfig) -> str:
    """The key from the named env var; a named but unset var is a config error (fails at start)."""
    if endpoint.api_key_env is None:
        return NO_KEY
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ValueError(f"environment variable {endpoint.api_key_env} (endpoint api_key_env) is not set")
    return key


class LLMClient:
    """Create one per process and stage; use it from one event loop."""

    def __init__(self, endpoint: EndpointConfig, cache: ResponseCache | None = None, *, openai_client=None):
        self.endpoint = endpoint
        self.cache = cache
        self.usage = Usage()
        self._api_key = resolve_api_key(endpoint)
        self._client = openai_client
        self._semaphore: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self._rejected: EndpointRejected | None = None

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

    async def chat(self, messages: list[dict], *, prompt_version: str, response_format: dict | None = None,
                   max_tokens: int | None = None, temperature: float | None = None,
                   validate: Validator | None = None) -> ChatResult:
        """One chat completion that passed `validate`: from the cache when this (model, prompt version,
        input) was paid for. Raises `LLMError` (with the last invalid reply, if any) or `EndpointRejected`."""
        args = request_args(self.endpoint, messages, response_format, max_tokens, temperature)
        key = cache_key(self.endpoint.model, prompt_version, args)
        hit = self._cached(key, validate)
        if hit is not None:
            return hit
        if key in self._inflight:  # the same request is already on its way: share its answer
            self.usage.deduplicated += 1
            result = await asyncio.shield(self._inflight[key])
            return ChatResult(**{**result.__dict__, "cached": True})
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._send(args, validate)
            result.key = key
            if self.cache is not None:
                self.cache.put(key, result.to_cache())
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) get it; no "never retrieved" warning
            raise
        finally:
            del self._inflight[key]

    def _cached(self, key: str, validate: Validator | None) -> ChatResult | None:
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is None:
            return None
        result = ChatResult(**{**hit, "cached": True, "key": key})
        if validate is not None:
            try:
                validate(result)
            except ValueError:  # written by an older version without this check: ask again
                return None
        self.usage.cache_hits += 1
        return result

    async def _send(self, args: dict, validate: Validator | None) -> ChatResult:
        client = self._openai()

        async def attempt() -> ChatResult:
            async with self._semaphore:
                if self._rejected is not None:  # checked after the wait: requests queued behind it stay home
                    raise self._rejected
                self.usage.requests += 1
                try:
                    result = await send(client, self.endpoint, args, self._api_key)
                except AttemptError as exc:
                    self.usage.errors[exc.kind] += 1
                    raise
                except EndpointRejected as exc:
                    self.usage.errors[f"http_{exc.status}"] += 1
                    self._rejected = exc
                    raise
                except LLMError as exc:
                    self.usage.errors[exc.kind] += 1
                    raise
            self.usage.add_tokens(result.prompt_tokens, result.completion_tokens,
                                  self.endpoint.price_per_1k_prompt_tokens,
                                  self.endpoint.price_per_1k_completion_tokens)
            if validate is not None:
                try:
                    validate(result)
                except ValueError as exc:
                    self.usage.errors["invalid_reply"] += 1
                    raise AttemptError("bad_response", f"invalid reply: {exc}", reply=result) from None
            return result

        try:
            result = await call_with_retries(attempt, self.endpoint, self.usage)
        except LLMError as exc:
            self.usage.failed += 1
            self.usage.last_error = f"{self.endpoint.base_url} (model {self.endpoint.model}): {exc}"
            raise
        self.usage.succeeded += 1
        return result

    async def aclose(self) -> None:
        if self._client is not None and hasattr(self._client, "close"):
            await self._client.close()
        self._client = None
        self._semaphore = None
