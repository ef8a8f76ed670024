"""Benchmark the HICom compressor at release dims (SigLIP 1152-d, 27 x 27 patches, Qwen2.5-7B 3584-d).

For each frame count: forward + backward time and peak memory of the compressor alone (batch 1,
`local43_global32`, release behaviour), and tokens kept vs the uncompressed frame tokens. The baseline,
measured in the same run, is the release's non-compressing `mlp2x_gelu` projector on every frame token
(what the LLM would see without compression); `--baseline-frames` picks where it runs.

CPU peak memory is the rise of the process's peak RSS during the step, measured in a fresh child
process per case; on CUDA it is `torch.cuda.max_memory_allocated`.

    python bench/compressor.py                       # 32 and 128 frames, CPU (+ CUDA when present)
    python bench/compressor.py --frames 32 --repeats 3 --devices cuda
    python bench/compressor.py --frames 32 --repeats 5 --pe-compare   # position table: per-forward copy vs buffer

`--pe-compare` also times `hicom-pe-copy`: the same compressor with the earlier position-table path (a
cached CPU table copied to the device on every forward) against the device buffer kept per shape now.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from model.compressor import HicomCompressor  # noqa: E402
from model.config import CompressorConfig  # noqa: E402
from model.global_compressor import position_encoding_3d  # noqa: E402

logger = logging.getLogger("bench.compressor")
SIDE, VISION_DIM, LLM_DIM = 27, 1152, 3584


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(kind: str, frames: int, device: str, repeats: int, threads: int | None) -> dict:
    """Time forward+backward of one projector on one clip; returns seconds, peak memory and tokens."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if kind in ("hicom", "hicom-pe-copy"):
        model = HicomCompressor(CompressorConfig()).to(device)
        if kind == "hicom-pe-copy":  # the earlier path: CPU table, copied to the device on every forward
            cpu_tables: dict = {}

            def copy_per_forward(t, h, w, dev, dtype):
                if (t, h, w) not in cpu_tables:
                    cpu_tables[(t, h, w)] = position_encoding_3d(t, h, w, VISION_DIM)
                return cpu_tables[(t, h, w)].to(device=dev, dtype=dtype)

            model.global_compressor.position_table = copy_per_forward
    else:  # mlp2x_gelu baseline: every frame token through Linear-GELU-Linear
        model = nn.Sequential(nn.Linear(VISION_DIM, LLM_DIM), nn.GELU(), nn.Linear(LLM_DIM, LLM_DIM)).to(device)
    value = torch.randn(1, frames, SIDE, SIDE, VISION_DIM, device=device)
    key = torch.randn_like(value)
    guide = torch.randn(1, VISION_DIM, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(value, key, guide) if kind.startswith("hicom") else model(value.flatten(1, 3))
        out.float().square().mean().backward()
        return out.shape[1]

    base = _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, cpu_times, tokens = [], [], 0
    for i in range(repeats + (1 if device == "cuda" else 0)):  # one CUDA warm-up step
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = step()
        _sync(device)
        if device != "cuda" or i > 0:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"kind": kind, "frames": frames, "device": device, "seconds": statistics.median(times),
            "cpu_seconds": statistics.median(cpu_times),
            "peak_bytes": max(peak, 0), "tokens": tokens, "uncompressed": frames * SIDE * SIDE}


def _child(queue, *args) -> None:
    queue.put(run_case(*args))


def measure(kind: str, frames: int, device: str, repeats: int, threads: int | None) -> dict:
    """Run a case in a fresh process (clean peak-RSS) on CPU; in-process on CUDA."""
    if device == "cuda":
        return run_case(kind, frames, device, repeats, threads)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kind, frames, device, repeats, threads))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per case (median reported)")
    parser.add_argument("--baseline-frames", type=int, nargs="*", default=[32],
                        help="frame counts where the mlp2x_gelu baseline also runs (it is slow on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--pe-compare", action="store_true",
                        help="also time the earlier per-forward position-table copy (before/after)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    results = []
    logger.info("compressor local43_global32 (release), batch 1, %dx%d patches, %d -> %d dims, threads=%s",
                SIDE, SIDE, VISION_DIM, LLM_DIM, args.threads or torch.get_num_threads())
    logger.info("%-6s %-10s %6s %8s %10s %10s %8s %s", "device", "projector", "frames", "tokens", "uncompr.",
                "fwd+bwd s", "peak MiB", "vs baseline")
    for device in devices:
        for frames in args.frames:
            row = measure("hicom", frames, device, args.repeats, args.threads)
            results.append(row)
            if args.pe_compare:
                before = measure("hicom-pe-copy", frames, device, args.repeats, args.threads)
                results.append(before)
                # process CPU time too: on a shared CPU, wall time mostly measures the other processes
                logger.info("%-6s %-13s %3d frames: before (copy per forward) %.4f s wall / %.4f s CPU, after "
                            "(device buffer) %.4f s wall / %.4f s CPU, wall x%.2f", device, "position table", frames,
                            before["seconds"], before["cpu_seconds"], row["seconds"], row["cpu_seconds"],
                            before["seconds"] / row["seconds"])
            base = None
            if frames in args.baseline_frames:
                base = measure("mlp2x_gelu", frames, device, args.repeats, args.threads)
                results.append(base)
            for r in ([row, base] if base else [row]):
                note = ""
                if r is row and base:
                    note = (f"time x{base['seconds'] / row['seconds']:.1f} faster, "
                            f"memory x{base['peak_bytes'] / max(row['peak_bytes'], 1):.1f} less, "
                            f"tokens x{base['tokens'] / row['tokens']:.1f} fewer")
                elif r is row:
                    note = f"{100 * (1 - r['tokens'] / r['uncompressed']):.1f} % fewer tokens"
                logger.info("%-6s %-10s %6d %8d %10d %10.3f %8.0f %s", r["device"], r["kind"], r["frames"],
                            r["tokens"], r["uncompressed"], r["seconds"], r["peak_bytes"] / 2**20, note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
