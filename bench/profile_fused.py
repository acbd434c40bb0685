"""Where the fused loss spends its time at small N: a ``torch.profiler`` breakdown and a chunk-size sweep.

At N = 1024 (SmolLM2 shape) the fused SFT path is slower than the three bare GEMMs by more than at large N. This
script shows why: one profiled forward + backward of ``fused_target_loss`` split into matrix products and the
elementwise passes over the ``[chunk, V]`` logits, and the time and peak memory for several chunk sizes (the
automatic one included), each in its own process. Results: ``bench/results/profile.csv`` and the ``profile``
section of ``docs/benchmarks.md``.

    python bench/profile_fused.py                          # SmolLM2 shape, N = 1024
    python bench/profile_fused.py --shape qwen --chunks 0 48 128 256
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

from bench_fused import MEMORY_ENV, RESULTS, SHAPES, _inputs, _peak_mb, _reset_peak
from docsection import write_section

CSV_PATH = RESULTS / "profile.csv"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")


def _fused_step(n: int, h: int, v: int, chunk_size: int | None, gemm: bool = False):
    """A closure for one forward + backward of fused SFT (or of the three bare GEMMs) on the benchmark's inputs."""
    import torch

    from targetsft import Chunking, fused_target_loss

    hidden, weight, labels, _, _ = _inputs(n, h, v, "cpu")
    if gemm:
        grad = torch.randn(n, v) * 1e-4
        hd, wd = hidden.detach(), weight.detach()
        return lambda: (hd @ wd.t(), grad @ wd, grad.t() @ hd)

    def run():
        fused_target_loss(hidden, weight, labels, method="sft", chunking=Chunking(chunk_size)).backward()
        hidden.grad = weight.grad = None

    return run


def time_once(n: int, h: int, v: int, chunk_size: int | None, gemm: bool, reps: int) -> dict:
    """Median time of ``reps`` steps after a warm-up, and the peak memory above the inputs during them."""
    import statistics
    import time

    run = _fused_step(n, h, v, chunk_size, gemm)
    run()
    base = _reset_peak("cpu")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_mb": _peak_mb("cpu") - base}


def profile_once(n: int, h: int, v: int, chunk_size: int | None) -> dict:
    """Self CPU time of one fused SFT forward + backward, grouped into matrix products and the rest."""
    from torch.profiler import ProfilerActivity, profile

    run = _fused_step(n, h, v, chunk_size)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    mm = sum(e.self_cpu_time_total for e in rows if e.key in MATMUL_OPS)
    top = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in rows[:12]]
    return {"total_s": total / 1e6, "matmul_s": mm / 1e6, "top": top}


def _spawn(args: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--chunks", type=int, nargs="*", default=[0, 128, 256, 512, 1024])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", nargs=2, metavar=("WHAT", "CHUNK"))
    args = ap.parse_args()
    h, v = SHAPES[args.shape]
    if args.worker:
        what, chunk = args.worker[0], int(args.worker[1]) or None
        if what == "profile":
            print(json.dumps(profile_once(args.n, h, v, chunk)))
        else:
            print(json.dumps(time_once(args.n, h, v, chunk, what == "gemm", args.reps)))
        return
    import torch

    from targetsft.losses.fused import auto_chunk_size

    auto = auto_chunk_size(args.n, v, torch.device("cpu"), h)
    base = ["--n", str(args.n), "--shape", args.shape, "--reps", str(args.reps), "--worker"]
    rows = []
    gemm = _spawn(base + ["gemm", "0"])
    gemm_mem = _spawn(base + ["gemm", "0"], MEMORY_ENV)["peak_mb"]
    for chunk in args.chunks:
        t = _spawn(base + ["time", str(chunk)])["time_s"]
        m = _spawn(base + ["time", str(chunk)], MEMORY_ENV)["peak_mb"]
        p = _spawn(base + ["profile", str(chunk)])
        rows.append(
            {
                "shape": args.shape,
                "n": args.n,
                "chunk": chunk or f"auto ({auto})",
                "time_s": round(t, 4),
                "ratio_gemm": round(t / gemm["time_s"], 3),
                "peak_mb": round(m, 1),
                "profiled_s": round(p["total_s"], 4),
                "matmul_share": round(p["matmul_s"] / p["total_s"], 3),
                "top_ops": "; ".join(f"{k} {s:.3f}s×{c}" for k, s, c in p["top"][:6]),
            }
        )
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    old = []
    if CSV_PATH.exists():
        with CSV_PATH.open() as fh:
            old = [r for r in csv.DictReader(fh) if (r["shape"], int(r["n"])) != (args.shape, args.n)]
    with CSV_PATH.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(old + rows)
    lines = [
        f"`bench/profile_fused.py --shape {args.shape} --n {args.n}`: fused SFT, H={h}, V={v}, fwd+bwd, median of "
        f"{args.reps}, each chunk size in its own process; bare GEMMs {gemm['time_s']:.3f} s / {gemm_mem:.0f} MB. "
        "`matmul share` = self CPU time of aten::mm/addmm in one profiled step.",
        "",
        "| chunk rows | time (s) | / GEMMs | peak MB | matmul share | largest ops (self CPU) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['chunk']} | {r['time_s']:.3f} | {r['ratio_gemm']:.2f} | {r['peak_mb']:.0f} | "
        f"{r['matmul_share']:.0%} | {r['top_ops']} |"
        for r in rows
    ]
    write_section(f"profile-{args.shape}-{args.n}", "\n".join(lines))


if __name__ == "__main__":
    main()
