"""One chat request through the `openai` package's typed `chat.completions.create`, and what its failure means.

The package's own retries are off (`max_retries=0`): `retry.py` retries with tenacity so that a reply can
also be retried when it fails validation, and so that a server's Retry-After pauses only the request that
got it. Errors are sorted into
- `AttemptError`: worth another attempt (timeout, connection, 408/409/429/5xx, an unreadable body),
- `EndpointRejected`: 401/403/404, the key, model or path is wrong: every request will fail the same way,
  so the run stops before anything is committed,
- `LLMError`: another 4xx, this request is refused (a failure record, the run goes on).
No message carries the key: server messages are redacted (OpenAI's 401 quotes a masked key).
"""
from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from typing import Any

from schemas.caption import EndpointConfig

NO_KEY = "no-key"  # sent to local servers that want no key (the openai package requires a value)
REJECTING_STATUSES = (401, 403, 404)
_KEY_LIKE = re.compile(r"\b(?:sk|pk|key|api[_-]?key)[-_][A-Za-z0-9*_\-]{6,}|Bearer\s+\S+", re.IGNORECASE)


class LLMError(Exception):
    """A call that failed for good: `kind` is timeout, rate_limited, server_error, connection, bad_response,
    client_error or rejected; `detail` never contains the key. `reply` is the last reply when it arrived but
    failed validation (the caller may salvage it; it is never cached)."""

    def __init__(self, kind: str, detail: str, attempts: int = 1, reply: "ChatResult | None" = None):
        super().__init__(f"{kind}: {detail} (after {attempts} attempt(s))")
        self.kind = kind
        self.detail = detail
        self.attempts = attempts
        self.reply = reply

    @property
    def transient(self) -> bool:
        """The endpoint was away or overloaded (worth a rerun), not a refusal or a bad reply."""
        return self.kind in ("timeout", "rate_limited", "server_error", "connection")


class EndpointRejected(LLMError, RuntimeError):
    """401/403/404 from an endpoint: a wrong key, model name or path. The run stops (exit 2) and commits
    nothing from the batch; the message names the endpoint and the status, never the key."""

    def __init__(self, base_url: str, model: str, status: int, detail: str):
        self.base_url, self.model, self.status = base_url, model, status
        super().__init__("rejected", f"{base_url} (model {model!r}) answered HTTP {status}: {detail}. "
                                     "Check the endpoint's base_url, model and api_key_env")


class AttemptError(Exception):
    """One attempt that may succeed when repeated; `retry_after_s` is the server's own pause, if it sent one."""

    def __init__(self, kind: str, detail: str, retry_after_s: float | None = None, reply=None):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.reply = reply


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

    def to_cache(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("cached", "key")}


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, `Retry-After: <seconds>` or `Retry-After: <HTTP date>`. Hand-written:
    the openai package parses these only inside its private retry loop, which tenacity replaces here."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                pass
    try:
        when = email.utils.parsedate_to_datetime(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


def redact(text: str, api_key: str) -> str:
    if api_key != NO_KEY:
        text = text.replace(api_key, "[key]")
    return _KEY_LIKE.sub("[key]", text)


def short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def request_args(endpoint: EndpointConfig, messages: list[dict], response_format: dict | None,
                 max_tokens: int | None, temperature: float | None) -> dict:
    """The keyword arguments of `chat.completions.create` (also what the cache key hashes). Forms a server
    understands but OpenAI's types do not (llama.cpp's `json_object` + `schema`) go in `extra_body`."""
    args = {"model": endpoint.model, "messages": messages,
            "temperature": endpoint.temperature if temperature is None else temperature,
            "max_tokens": max_tokens or endpoint.max_tokens}
    if response_format is not None:
        if response_format.get("type") == "json_object" and "schema" in response_format:
            args["extra_body"] = {"response_format": response_format}
        else:
            args["response_format"] = response_format
    return args


async def send(client, endpoint: EndpointConfig, args: dict, api_key: str) -> ChatResult:
    """One attempt; raises AttemptError, EndpointRejected or LLMError."""
    import openai

    try:
        completion = await client.chat.completions.create(**args, timeout=endpoint.timeout_s)
    except openai.APITimeoutError:
        raise AttemptError("timeout", f"no answer within {endpoint.timeout_s:g}s") from None
    except openai.APIStatusError as exc:
        status = exc.status_code
        retry_after = parse_retry_after(getattr(exc.response, "headers", None))
        message = redact(short(exc.message), api_key)
        if status == 429:
            raise AttemptError("rate_limited", "HTTP 429", retry_after) from None
        if status >= 500 or status in (408, 409):
            raise AttemptError("server_error", f"HTTP {status}", retry_after) from None
        if status in REJECTING_STATUSES:
            raise EndpointRejected(endpoint.base_url, endpoint.model, status, message) from None
        raise LLMError("client_error", f"HTTP {status}: {message}") from None
    except openai.APIConnectionError as exc:
        raise AttemptError("connection", type(exc).__name__) from None
    except (openai.APIError, ValueError) as exc:  # a body that is not a chat completion
        raise AttemptError("bad_response", f"{type(exc).__name__}: {redact(short(str(exc)), api_key)}") from None
    if not getattr(completion, "choices", None):
        raise AttemptError("bad_response", "no choices in the response")
    choice = completion.choices[0]
    content = choice.message.content if choice.message is not None else None
    usage = completion.usage
    return ChatResult(text=content or "", finish_reason=choice.finish_reason,
                      prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                      completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                      model=str(completion.model or endpoint.model))
