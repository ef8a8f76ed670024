"""Benchmark the LLM client: achieved requests/s against a stub with fixed latency L at concurrency C.

The ceiling is C / L (C requests in flight, each taking L seconds); the target is >= 0.9 of it. The stub runs
in its own process (its own interpreter lock), on 127.0.0.1, so the figure is the client's.
Run: .venv/bin/python bench/caption_client.py [--latency-s 0.5] [--concurrency 16] [--requests 400]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.caption import EndpointConfig  # noqa: E402
from stages.llm_client import LLMClient, ResponseCache  # noqa: E402


async def run(base_url: str, concurrency: int, n: int, cache_dir: Path | None) -> tuple[float, float, LLMClient]:
    endpoint = EndpointConfig(base_url=base_url, model="stub", max_concurrency=concurrency, timeout_s=30.0)
    client = LLMClient(endpoint, ResponseCache(cache_dir) if cache_dir else None)
    await asyncio.gather(*(client.chat([{"role": "user", "content": f"warm-up {i}"}], prompt_version="bench")
                           for i in range(concurrency)))  # open the connections first
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client.chat([{"role": "user", "content": f"request {i}"}], prompt_version="bench")
                           for i in range(n)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await client.aclose()
    return elapsed, cpu, client


def bench(latency_s: float, concurrency: int, requests: int, cache: Path | None) -> float:
    stub = subprocess.Popen([sys.executable, "-m", "tests.stub_openai", str(latency_s)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        base_url = stub.stdout.readline().strip()
        elapsed, cpu, client = asyncio.run(run(base_url, concurrency, requests, cache))
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as response:
            stats = json.loads(response.read())
    finally:
        stub.stdin.close()
        stub.wait(timeout=10)
    achieved, ceiling = requests / elapsed, concurrency / latency_s
    ratio = achieved / ceiling
    print(f"L={latency_s:g}s C={concurrency}: {requests} requests in {elapsed:.2f}s, client CPU "
          f"{cpu / requests * 1000:.1f} ms/request, max in flight at the stub {stats['max_in_flight']}, "
          f"failed {client.usage.failed}")
    print(f"  achieved {achieved:.1f} req/s, ceiling C/L {ceiling:.1f} req/s, ratio {ratio:.3f} "
          f"({'meets' if ratio >= 0.9 else 'below'} the 0.9 target)")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-s", type=float, nargs="+", default=[1.0, 0.5],
                        help="stub latency per request (L); several values run several benchmarks")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32], help="client max_concurrency (C)")
    parser.add_argument("--requests", type=int, default=0, help="requests per run (default: 10 x C)")
    parser.add_argument("--cache", type=Path, help="also write the response cache here (default: no cache)")
    args = parser.parse_args(argv)
    for latency in args.latency_s:
        for concurrency in args.concurrency:
            bench(latency, concurrency, args.requests or 10 * concurrency, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
