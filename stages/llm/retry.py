"""Retries with tenacity: exponential backoff with full jitter, and a server's Retry-After for that request.

Only `AttemptError`s are retried (timeouts, connection errors, 408/409/429/5xx, unreadable or invalid
replies); each request waits on its own, so one 429 with `Retry-After: 2` pauses that request, not the
client's other requests.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, RetryError, retry_if_exception_type, stop_after_attempt, \
    wait_random_exponential

from schemas.caption import EndpointConfig
from stages.llm.accounting import Usage
from stages.llm.transport import AttemptError, LLMError

log = logging.getLogger(__name__)


class wait_retry_after:
    """The server's Retry-After (capped) when the failed attempt carried one, else the fallback wait."""

    def __init__(self, fallback, cap_s: float):
        self.fallback = fallback
        self.cap_s = cap_s

    def __call__(self, state: RetryCallState) -> float:
        delay = self.fallback(state)
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, AttemptError) and exc.retry_after_s is not None:
            delay = max(delay, min(exc.retry_after_s, self.cap_s))
        return delay


def retrying(endpoint: EndpointConfig, usage: Usage) -> AsyncRetrying:
    """The retry policy of one endpoint; `usage` counts errors by kind and retries."""

    def before_sleep(state: RetryCallState) -> None:
        usage.retries += 1
        log.debug("retry %d of %s in %.2fs: %s", state.attempt_number, endpoint.model,
                  state.next_action.sleep if state.next_action else 0.0, state.outcome.exception())

    return AsyncRetrying(
        retry=retry_if_exception_type(AttemptError),
        stop=stop_after_attempt(endpoint.max_retries + 1),
        wait=wait_retry_after(wait_random_exponential(multiplier=endpoint.backoff_base_s,
                                                      max=endpoint.backoff_max_s), endpoint.max_retry_after_s),
        before_sleep=before_sleep, reraise=False)


async def call_with_retries(attempt: Callable[[], Awaitable], endpoint: EndpointConfig, usage: Usage):
    """`await attempt()` until it returns, raises a non-retryable error, or the attempts run out (then an
    `LLMError` of the last attempt's kind, carrying its reply when one arrived)."""
    policy = retrying(endpoint, usage)
    try:
        return await policy(attempt)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        attempts = exc.last_attempt.attempt_number
        raise LLMError(last.kind, last.detail, attempts, getattr(last, "reply", None)) from None
