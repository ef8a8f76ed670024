"""A stub OpenAI-compatible server on 127.0.0.1 for tests and the client benchmark.

`POST /v1/chat/completions` answers with `responder(body) -> content` after `latency_s`, or misbehaves:
- globally: `stub.mode = "400" | "401" | "403" | "404" | "429" | "500" | "hang" | "malformed" | "bad_body" |
  "ok"`, for the first `stub.fail_times` requests of each input (None: always), or for every `stub.every`-th
  request overall (`stub.every = 3`: requests 3, 6, 9, ...);
- per input: a marker `[[stub:MODE:N]]` in the last user message fails that input's first N requests.
`stub.latency_for(body) -> seconds` (optional) gives each request its own latency (a spread).
`400` is a non-retryable client error, `401/403/404` reject the key/model/path; `429` carries
`Retry-After: stub.retry_after` (seconds); `hang` sleeps
`stub.hang_s` (past the client's timeout) and closes the connection without an answer;
`malformed` answers 200 with a content that is not JSON; `bad_body` answers 200 with a body that is not JSON.
Requests are counted per input (hash of the messages), so tests can assert that a resume repeats none.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable

_MARKER = re.compile(r"\[\[stub:(\w+):(\d+)\]\]")


def input_key(messages: list) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            return str(content or "")
    return ""


def echo_responder(body: dict) -> str:
    return json.dumps({"echo": last_user_text(body)[:200]})


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error"}
_ERRORS = ("400", "401", "403", "404", "429", "500")


class StubOpenAI:
    """Start with `with StubOpenAI() as stub:`; `stub.base_url` is the `/v1` URL. An asyncio HTTP/1.1 server
    (keep-alive) in a daemon thread: cheap per request, so the client benchmark measures the client."""

    def __init__(self, responder: Callable[[dict], str] = echo_responder, latency_s: float = 0.0):
        self.responder = responder
        self.latency_s = latency_s
        self.mode = "ok"
        self.fail_times: int | None = None
        self.every: int | None = None
        self.latency_for: Callable[[dict], float] | None = None
        self._arrivals = 0
        self.retry_after = 0.05
        self.hang_s = 5.0
        self.counts: Counter = Counter()  # requests per input
        self.statuses: Counter = Counter()  # replies by status (and "hang")
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []  # every request body, in arrival order
        self.received_at: list[float] = []  # time.monotonic() of each request's arrival (same order)
        self.answered_at: list[float] = []  # time.monotonic() of each answer sent
        self._busy: list[tuple[float, int]] = []  # (time, requests in flight from then on)
        self.auth_headers: set[str] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.statuses.clear()
            self.bodies.clear()
            self.max_in_flight = 0

    def __enter__(self) -> "StubOpenAI":
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start():
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=512)
            self._port = self._server.sockets[0].getsockname()[1]
            ready.set()

        def run():
            self._loop.run_until_complete(start())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="stub-openai")
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
                raw = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                status, data, extra = await self._handle(method, path.rstrip("/"), headers, raw)
                if status is None:  # hang: the client gave up; close without an answer
                    break
                head_out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "content-type: application/json",
                            f"content-length: {len(data)}", *(f"{k}: {v}" for k, v in extra.items())]
                writer.write(("\r\n".join(head_out) + "\r\n\r\n").encode("latin-1") + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, ValueError):
            pass
        finally:
            writer.close()

    async def _handle(self, method: str, path: str, headers: dict, raw: bytes):
        if method == "GET" and path == "/stats":
            span = (max(self.answered_at) - min(self.received_at)) if self.answered_at else 0.0
            # mean requests in flight from the first request to the last one's arrival (while work was queued)
            end = max(self.received_at) if self.received_at else 0.0
            steps = [(t, n) for t, n in self._busy if t <= end] + [(end, 0)]
            busy = sum((t2 - t1) * n for (t1, n), (t2, _) in zip(steps, steps[1:]))
            mean_in_flight = busy / (end - steps[0][0]) if len(steps) > 1 and end > steps[0][0] else 0.0
            latencies = [self.latency_for(b) if self.latency_for else self.latency_s for b in self.bodies]
            return 200, json.dumps({"total": self.total, "max_in_flight": self.max_in_flight, "span_s": span,
                                    "mean_in_flight": mean_in_flight,
                                    "mean_latency_s": sum(latencies) / max(len(latencies), 1),
                                    "statuses": {str(k): v for k, v in self.statuses.items()}}).encode(), {}
        if method == "GET" and path in ("/v1/models", "/health"):
            return 200, json.dumps({"data": [{"id": "stub"}]}).encode(), {}
        if method != "POST" or path != "/v1/chat/completions":
            return 404, b'{"error": "not found"}', {}
        body = json.loads(raw or b"{}")
        key = input_key(body.get("messages", []))
        with self._lock:
            self.bodies.append(body)
            self.received_at.append(time.monotonic())
            self.auth_headers.add(headers.get("authorization", ""))
            self.counts[key] += 1
            n = self.counts[key]
            self._arrivals += 1
            arrival = self._arrivals
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._busy.append((time.monotonic(), self.in_flight))
        try:
            return await self._reply(key, n, body, headers.get("authorization", ""), arrival)
        finally:
            with self._lock:
                self.in_flight -= 1
                self.answered_at.append(time.monotonic())
                self._busy.append((self.answered_at[-1], self.in_flight))

    def _mode_for(self, key: str, n: int, body: dict, arrival: int = 0) -> str:
        """The behaviour for the n-th (1-based) request of this input (the `arrival`-th overall)."""
        match = _MARKER.search(last_user_text(body))
        if match:
            return match.group(1) if n <= int(match.group(2)) else "ok"
        if self.every is not None:
            return self.mode if arrival % self.every == 0 else "ok"
        if self.mode != "ok" and (self.fail_times is None or n <= self.fail_times):
            return self.mode
        return "ok"

    async def _reply(self, key: str, n: int, body: dict, auth: str = "", arrival: int = 0):
        mode = self._mode_for(key, n, body, arrival)
        latency = self.latency_for(body) if self.latency_for is not None else self.latency_s
        if latency:
            await asyncio.sleep(latency)
        self.statuses[mode if mode in ("hang", "bad_body") else int(mode) if mode in _ERRORS else 200] += 1
        if mode == "hang":
            await asyncio.sleep(self.hang_s)
            return None, b"", {}
        if mode == "400":  # like OpenAI's 401/400 messages, it quotes the key it was given
            message = f"bad request; incorrect API key provided: {auth.removeprefix('Bearer ')}"
            return 400, json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode(), {}
        if mode in ("401", "403", "404"):
            message = f"rejected: incorrect API key provided: {auth.removeprefix('Bearer ')}"
            return int(mode), json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode(), {}
        if mode == "429":
            return 429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}', \
                {"retry-after": f"{self.retry_after:g}"}
        if mode == "500":
            return 500, b'{"error": {"message": "boom", "type": "server_error"}}', {}
        if mode == "bad_body":
            return 200, b"<html>not json", {}
        content = "Sure! Here are the pairs: {pairs: [oops" if mode == "malformed" else self.responder(body)
        prompt = last_user_text(body)
        reply = {"id": f"chatcmpl-{key}-{n}", "object": "chat.completion", "created": int(time.time()),
                 "model": body.get("model", "stub"),
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}],
                 "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                           "total_tokens": len(prompt.split()) + len(content.split())}}
        return 200, json.dumps(reply).encode("utf-8"), {}


def spread_latency(latency_s: float, slow_every: int, slow_factor: float) -> Callable[[dict], float]:
    """Every `slow_every`-th input (by hash, so a retry is as slow) takes `slow_factor` x `latency_s`."""
    def latency_for(body: dict) -> float:
        slow = slow_every > 0 and int(input_key(body.get("messages", [])), 16) % slow_every == 0
        return latency_s * (slow_factor if slow else 1.0)

    return latency_for


def serve_forever(latency_s: float, slow_every: int = 0, slow_factor: float = 1.0) -> None:
    """`python -m tests.stub_openai LATENCY_S [SLOW_EVERY SLOW_FACTOR]`: serve in this process (own GIL),
    print the base URL; `GET /stats` also gives the span from the first request to the last answer."""
    import sys

    with StubOpenAI(pairs_responder, latency_s=latency_s) as stub:
        if slow_every:
            stub.latency_for = spread_latency(latency_s, slow_every, slow_factor)
        print(stub.base_url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


# --- fake records and a responder that writes pairs from the prompt (for the caption tests) ----------

def jpeg(seed: int, size: int = 64) -> bytes:
    """A small JPEG whose content depends on `seed` (different seeds hash far apart)."""
    import io
    import random

    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size))
    block = size // 8
    for by in range(8):
        for bx in range(8):
            colour = tuple(rng.randrange(256) for _ in range(3))
            img.paste(colour, (bx * block, by * block, (bx + 1) * block, (by + 1) * block))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_result(video_id: str, captions: list, frame_seed: int = 0, frames_per_clip: int = 4):
    """A VideoResult with one clip per caption (None: no caption), distinct frames per clip, and the
    manifest caption pair that stages/pairs.py would have attached."""
    from schemas.config import InputConfig
    from schemas.records import ClipRecord, ShardSample, VideoResult
    from stages.pairs import attach_pairs

    result = VideoResult(video_id=video_id, source=f"{video_id}.mp4")
    for i, text in enumerate(captions):
        start, end = 2.0 * i, 2.0 * i + 2.0
        clip = ClipRecord(id=ClipRecord.make_id(video_id, start, end), video_id=video_id, source=f"{video_id}.mp4",
                          start_s=start, end_s=end, frame_times_s=[start + 0.5 * k for k in range(frames_per_clip)],
                          frame_indices=list(range(frames_per_clip)), frames_in_clip=frames_per_clip * 10,
                          frame_size_px=64, caption=text)
        frames = [jpeg(frame_seed * 1000 + i * 10 + k) for k in range(frames_per_clip)]
        result.samples.append(attach_pairs(ShardSample(clip=clip, frames=frames), InputConfig()))
    return result


_DESCRIPTION = re.compile(r"Description: (.*?)\nTitle:", re.DOTALL)
_COT_CAPTION = re.compile(r"A detailed description of the clip:\n(.*?)\n\nWrite", re.DOTALL)
_KINDS = re.compile(r"Kinds: ([a-z_, ]+)\s*$")
VLM_CAPTION = "A man in a red jacket walks a brown dog along a sandy beach while waves roll in."


def requested_schema(body: dict) -> dict:
    """The JSON schema of the request's response_format (OpenAI's form or llama.cpp's), or {}."""
    fmt = body.get("response_format") or {}
    return (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema") or {}


def schema_pairs(schema: dict) -> tuple[int, list[str]] | None:
    """(number of pairs, kinds) a pairs schema asks for (pydantic's form: $defs, enum or const)."""
    pairs = (schema.get("properties") or {}).get("pairs")
    if not pairs:
        return None
    kind = next(iter(d["properties"]["kind"] for d in (schema.get("$defs") or {}).values()
                     if "kind" in d.get("properties", {})), {})
    kinds = kind.get("enum") or ([kind["const"]] if "const" in kind else ["open_question"])
    return pairs.get("minItems", len(kinds)), kinds


def image_count(body: dict) -> int:
    return sum(1 for m in body.get("messages", []) if isinstance(m.get("content"), list)
               for part in m["content"] if part.get("type") == "image_url")


def pairs_responder(body: dict) -> str:
    """Grounded pairs for the last description in the prompt, one per requested kind (kinds and count from
    the request's schema when it has one); a dense caption when the schema asks for one."""
    schema = requested_schema(body)
    if "caption" in (schema.get("properties") or {}):
        return json.dumps({"caption": f"{VLM_CAPTION} ({image_count(body)} frames)"})
    text = last_user_text(body)
    captions = _DESCRIPTION.findall(text) or _COT_CAPTION.findall(text)
    caption = captions[-1].strip() if captions else "a scene"
    asked = schema_pairs(schema)
    kinds_match = _KINDS.search(text.strip())
    if asked is not None and not kinds_match:
        kinds = [asked[1][i % len(asked[1])] for i in range(asked[0])]
    else:
        kinds = [k.strip() for k in kinds_match.group(1).split(",")] if kinds_match else ["open_question"]
    words = [w.strip(".,").lower() for w in caption.split() if len(w.strip(".,")) > 3]
    noun = words[-1] if words else "scene"
    nouns = [w for w in words if w.isalpha()][:8] or ["scene"]
    questions = {"open_question": "What is happening in this clip?",
                 "focused_description": f"Describe the {noun} in detail.",
                 "temporal": "What happens as the clip goes on?",
                 "counting": f"How many {noun}s can be seen?",
                 "attribute": f"What does the {noun} look like?"}
    pairs = []
    for i, kind in enumerate(kinds):
        if kind == "multiple_choice":
            instruction = (f"What is shown in the clip? A. An empty room B. {caption.rstrip('.')} "
                           f"C. A city at night D. A snowy field")
            answer = f"B. {caption}"
        elif kind == "instruction_followed_description":
            subject = nouns[i % len(nouns)]
            instruction = f"Describe the {subject} that appears in the video in detail, pair {i + 1}."
            answer = f"The {subject} is part of this scene: {caption[:1].lower()}{caption[1:]}"
        else:
            instruction = questions.get(kind, f"Question {i}: what is in the clip?")
            answer = f"In the clip, {caption[:1].lower()}{caption[1:]}"
        pairs.append({"kind": kind, "instruction": instruction, "answer": answer})
    return json.dumps({"pairs": pairs})


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    serve_forever(float(args[0]) if args else 0.0, int(args[1]) if len(args) > 1 else 0,
                  float(args[2]) if len(args) > 2 else 1.0)
