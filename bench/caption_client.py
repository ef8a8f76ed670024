"""Benchmark the captioning Ray stage against a stub endpoint with a latency spread.

N videos of one clip each go through the build's own caption -> instruct actor stages on local Ray (one
instruct request per video). The stub (its own process, 127.0.0.1) answers in L seconds, and every
`--slow-every`-th request takes `--slow-factor` x L. With C requests in flight the ceiling is C / mean
latency. Two figures, both measured at the stub (Ray's actor start-up is not counted): the mean number of
requests in flight while work was queued, over C (by Little's law, achieved / ceiling throughput in steady
state), and requests over the span from the first request to the last answer, over C / mean latency (this
one also pays the tail: the last slow request). Target >= 0.9, with and without the response cache.
Run: .venv/bin/python bench/caption_client.py [--latency-s 0.5] [--concurrency 16] [--requests 160]
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.captioning import apply_stages, caption_stages  # noqa: E402
from schemas.caption import CaptioningConfig  # noqa: E402
from schemas.config import RunConfig  # noqa: E402
from stages.ray_adapter import from_row, to_row  # noqa: E402
from stages.ray_runtime import init_ray  # noqa: E402
from tests.stub_openai import make_result  # noqa: E402


def run_stage(base_url: str, concurrency: int, n: int, cache: bool, work: Path) -> tuple[float, int]:
    """Wall seconds of the Ray stages and how many pairs came back."""
    import ray

    cap = CaptioningConfig.model_validate({
        "instruct": {"pairs_per_clip": 2, "endpoint": {"base_url": base_url, "model": "stub",
                                                       "max_concurrency": concurrency, "timeout_s": 60}},
        "actors": {"queue_videos": 2 * concurrency}, "cache_responses": cache})  # as the defaults: 16 vs 8
    videos = [make_result(f"v{i}", [f"A person number {i} walks a dog along a beach at sunset."], frame_seed=i,
                          frames_per_clip=1) for i in range(n)]
    ds = ray.data.from_items([to_row(v) for v in videos], override_num_blocks=n)
    stages = caption_stages(RunConfig(captioning=cap), work, cluster_cpus=float(ray.cluster_resources()["CPU"]))
    started = time.perf_counter()
    results = [from_row(row) for row in apply_stages(ds, stages[:2]).iter_rows()]
    pairs = sum(1 for r in results for s in r.samples for p in s.pairs if p.source == "llm")
    return time.perf_counter() - started, pairs


def bench(latency_s: float, concurrency: int, requests: int, slow_every: int, slow_factor: float,
          cache: bool) -> float:
    stub = subprocess.Popen([sys.executable, "-m", "tests.stub_openai", str(latency_s), str(slow_every),
                             str(slow_factor)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        base_url = stub.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as work:
            wall, pairs = run_stage(base_url, concurrency, requests, cache, Path(work))
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as response:
            stats = json.loads(response.read())
    finally:
        stub.stdin.close()
        stub.wait(timeout=10)
    achieved = stats["total"] / stats["span_s"]
    ceiling = concurrency / stats["mean_latency_s"]
    ratio = stats["mean_in_flight"] / concurrency
    print(f"Ray stage, cache {'on' if cache else 'off'}: L={latency_s:g}s, every {slow_every}th request "
          f"{slow_factor:g}x slower (mean {stats['mean_latency_s']:.3f}s), C={concurrency}: {stats['total']} "
          f"requests in {stats['span_s']:.2f}s at the stub ({wall:.1f}s wall with Ray start-up), "
          f"{pairs} pairs, max in flight {stats['max_in_flight']}")
    print(f"  steady state: {stats['mean_in_flight']:.2f} requests in flight of C={concurrency}, ratio {ratio:.3f} "
          f"({'meets' if ratio >= 0.9 else 'below'} the 0.9 target); whole span incl. the tail: "
          f"{achieved:.2f} req/s vs C/mean latency {ceiling:.2f} req/s = {achieved / ceiling:.3f}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-s", type=float, default=0.5, help="stub latency per request (L)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (C)")
    parser.add_argument("--requests", type=int, default=0, help="videos = requests (default: 10 x C)")
    parser.add_argument("--slow-every", type=int, default=10, help="every k-th request is slow (0: none)")
    parser.add_argument("--slow-factor", type=float, default=10.0, help="how much slower")
    parser.add_argument("--num-cpus", type=int, default=2, help="local Ray CPUs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    init_ray(num_cpus=args.num_cpus)  # the project's one local-Ray start
    ray.data.DataContext.get_current().enable_progress_bars = False
    for cache in (True, False):
        bench(args.latency_s, args.concurrency, args.requests or 10 * args.concurrency, args.slow_every,
              args.slow_factor, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
