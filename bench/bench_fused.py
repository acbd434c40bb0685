"""Time (forward + backward) and peak memory of the fused target loss against its peers, side by side.

Every (implementation, shape) is timed in its own process (median of the repetitions after a warm-up). Its peak
memory comes from a second process run with ``MALLOC_MMAP_THRESHOLD_=65536`` (so freed buffers leave the
resident set instead of staying in glibc's cache): peak RSS during one forward + backward, after a warm-up, above
the RSS at that point (Linux: the peak is reset through ``/proc/self/clear_refs``); imports, inputs and
compilation do not count, the gradients and every temporary do. On CUDA: ``torch.cuda.max_memory_allocated``
above the allocation at that point. Results are appended to ``bench/results/fused.csv`` as they come (a rerun
skips finished rows), then plotted to ``bench/results/fused_*.png`` and tabulated into ``docs/benchmarks.md``.

    python bench/bench_fused.py                 # full grid
    python bench/bench_fused.py --quick         # N = 1024, 4096 only
    python bench/bench_fused.py --report        # redraw the plot and the table from the CSV
    python bench/bench_fused.py --device cuda --dtype bf16 --shapes qwen llama3_8b --n 8192 --csv OUT/fused.csv \
        --no-report                             # the GPU acceptance run's step (bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from docsection import write_section
from timing import append_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CSV_PATH = RESULTS / "fused.csv"
FIELDS = ["device", "shape", "n", "h", "v", "impl", "time_s", "peak_mb", "error", "torch", "date", "dtype"]
SHAPES = {"smollm2": (576, 49152), "qwen": (1536, 151936), "llama3_8b": (4096, 128256), "tiny": (64, 4096)}
GRID = {"smollm2": [1024, 2048, 4096, 8192, 16384], "qwen": [1024], "llama3_8b": [4096], "tiny": [256]}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DEFAULT_SHAPES = ["smollm2", "qwen"]  # llama3_8b (bench/gpu_check.sh) on request
IMPLS = [
    "gemm",
    "naive",
    "torch_lce",
    "trl",
    "cce",
    "fused_sft",
    "fused_dft",
    "fused_kd_top64",
    "fused_target_sft_top64",
    "liger",  # Triton: a GPU's only (on a CPU its row records the error)
]
TOPK = 64
# glibc keeps freed buffers resident, so peak RSS would measure the allocator's cache rather than what an
# implementation holds; with this threshold every buffer of 64 KiB or more is mmapped and returned on free. It slows
# the run (page faults), so the memory process is separate from the timed one.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
IGNORE_EVERY = 7  # one token in seven carries no loss (prompt/padding)


def _inputs(n: int, h: int, v: int, device: str, dtype: str = "fp32"):
    import torch

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, DTYPES[dtype])
    # in-place scaling: the inputs-only baseline process must not peak above the inputs themselves
    hidden = torch.randn(n, h, generator=g).mul_(0.5).to(device, dt).requires_grad_(True)
    weight = torch.randn(v, h, generator=g).mul_(1.0 / h**0.5).to(device, dt).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::IGNORE_EVERY] = -100
    ids = torch.stack([torch.randperm(v, generator=g)[:TOPK] for _ in range(min(n, 64))]).repeat(n // 64 + 1, 1)[:n]
    logprobs = torch.log_softmax(torch.randn(n, TOPK, generator=g), -1) - 0.1  # 90% of the mass in the top-k
    return hidden, weight, labels.to(device), ids.to(device), logprobs.to(device)


def _step(impl: str, hidden, weight, labels, ids, logprobs):
    """One forward + backward of ``impl``; returns a closure."""
    import torch
    import torch.nn.functional as F

    if impl == "gemm":
        grad = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device) * 1e-4
        hd, wd = hidden.detach(), weight.detach()

        def run():
            z = hd @ wd.t()
            gh = grad @ wd
            gw = grad.t() @ hd
            return z, gh, gw

        return run
    if impl == "naive":
        return lambda: F.cross_entropy(hidden @ weight.t(), labels).backward()
    if impl == "torch_lce":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(hidden, weight, labels, options=opts).backward()
    if impl == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        mask = labels != -100

        def run():
            logp = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, 32768, None, 1.0, ())[0]
            (-logp.sum() / mask.sum()).backward()

        return run
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        kernel = "cce" if hidden.is_cuda else "torch_compile"  # its Triton kernel where there is one
        return lambda: linear_cross_entropy(hidden, weight, labels, impl=kernel).backward()
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda: liger(weight, hidden, labels).backward()
    from targetsft import TopK, fused_target_loss

    method = impl.removeprefix("fused_").removesuffix(f"_top{TOPK}")
    kw = {"teacher": TopK(ids, logprobs)} if impl.endswith(f"_top{TOPK}") else {}
    return lambda: fused_target_loss(hidden, weight, labels, method=method, **kw).backward()


def _status_mb(field: str) -> float:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status`` in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: str) -> float:
    """Start measuring the peak from now (imports and inputs excluded); returns the current usage in MiB."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
    return _status_mb("VmRSS")


def _peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


def worker(impl: str, n: int, h: int, v: int, device: str, reps: int, dtype: str = "fp32") -> dict:
    import torch

    torch.manual_seed(0)
    hidden, weight, labels, ids, logprobs = _inputs(n, h, v, device, dtype)
    run = _step(impl, hidden, weight, labels, ids, logprobs)  # imports and any precomputed input happen here

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up (and compilation where any)
    sync()
    hidden.grad = weight.grad = None
    base = _reset_peak(device)
    times = []
    for _ in range(reps):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_mb": _peak_mb(device) - base}


def _spawn(impl: str, n: int, h: int, v: int, device: str, reps: int, dtype: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(n), str(h), str(v), "--device", device, "--reps", str(reps)]
    cmd += ["--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1][:300] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _done(csv_path: Path) -> set[tuple]:
    if not csv_path.exists():
        return set()
    with csv_path.open() as f:
        return {(r["device"], r["shape"], int(r["n"]), r["impl"], r.get("dtype") or "fp32") for r in csv.DictReader(f)}


def run_grid(
    device: str,
    quick: bool,
    impls: list[str],
    shapes: list[str],
    csv_path: Path = CSV_PATH,
    ns: list[int] | None = None,
    dtype: str = "fp32",
) -> None:
    """Time every (shape, N, impl) not yet in ``csv_path`` (N from ``GRID`` unless ``ns`` is given)."""
    import torch

    done = _done(csv_path)
    for shape in shapes:
        h, v = SHAPES[shape]
        for n in ns or GRID[shape]:
            if quick and n not in (1024, 4096):
                continue
            pending = [i for i in impls if (device, shape, n, i, dtype) not in done]
            if not pending:
                continue
            reps = 3 if n * v <= 4096 * 49152 or device == "cuda" else 2
            for impl in pending:
                res = _spawn(impl, n, h, v, device, reps, dtype)
                if "time_s" in res and device == "cpu":  # memory: a second process where every buffer >= 64 KiB
                    mem = _spawn(impl, n, h, v, device, 1, dtype, MEMORY_ENV)  # is its own mapping, freed when freed
                    res["peak_mb"] = mem.get("peak_mb", float("nan"))
                row = {
                    "device": device,
                    "shape": shape,
                    "n": n,
                    "h": h,
                    "v": v,
                    "impl": impl,
                    "time_s": f"{res['time_s']:.4f}" if "time_s" in res else "",
                    "peak_mb": f"{res['peak_mb']:.1f}" if "peak_mb" in res else "",
                    "error": res.get("error", ""),
                    "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"),
                    "dtype": dtype,
                }
                append_rows(csv_path, FIELDS, [row])
                t, mb = row["time_s"] or "-", row["peak_mb"] or "-"
                print(f"{shape} N={n} {impl:<24} {t:>9} s {mb:>9} MB {row['error']}", flush=True)


def _rows() -> list[dict]:
    with CSV_PATH.open() as f:
        return list(csv.DictReader(f))


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows()
    devices = sorted({r["device"] for r in rows})
    lines = [
        "## Fused lm_head + target loss",
        "",
        "Generated by `python bench/bench_fused.py` (then `--report`); raw numbers in `bench/results/fused.csv`.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}; "
        "time = median forward + backward in a process per cell; memory = peak RSS of one forward + backward above "
        "the RSS before it, in a second process with `MALLOC_MMAP_THRESHOLD_=65536` so that freed buffers are "
        "returned (CUDA: max allocated above the inputs); gradients included. "
        f"One label in {IGNORE_EVERY} is ignored; "
        f"teachers are top-{TOPK}. TRL = `trl.kernels.chunked_logprob.ChunkedLogProbFunction` on the loss rows "
        "(its best case); gemm = the three bare matmuls of an unfused step (forward logits, both backward "
        "products) with a precomputed gradient: the floor.",
        "",
    ]
    for device in devices:
        for shape in SHAPES:
            cell = [r for r in rows if r["device"] == device and r["shape"] == shape]
            if not cell:
                continue
            ns = sorted({int(r["n"]) for r in cell})
            h, v = SHAPES[shape]
            lines += [f"## {device}, {shape} (H={h}, V={v})", ""]
            lines.append("| impl | " + " | ".join(f"N={n} time s / MB" for n in ns) + " |")
            lines.append("|---|" + "---|" * len(ns))
            for impl in IMPLS:
                if not any(r["impl"] == impl for r in cell):
                    continue
                out = []
                for n in ns:
                    r = next((r for r in cell if int(r["n"]) == n and r["impl"] == impl), None)
                    if r is None:
                        out.append("")
                    elif r["error"]:
                        out.append("error")
                    else:
                        out.append(f"{float(r['time_s']):.2f} / {float(r['peak_mb']):.0f}")
                lines.append(f"| {impl} | " + " | ".join(out) + " |")
            errors = {r["impl"]: r["error"] for r in cell if r["error"]}
            for impl, err in errors.items():
                lines.append(f"\n{impl} failed here: `{err}`")
            lines += ["", _ratios(cell, ns), ""]
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for impl in IMPLS:
                pts = [
                    (int(r["n"]), float(r["time_s"]), float(r["peak_mb"]))
                    for r in cell
                    if r["impl"] == impl and not r["error"]
                ]
                if pts:
                    axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
                    if impl != "gemm":
                        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=impl)
            for ax, title in zip(axes, ["time fwd+bwd (s)", "peak memory above inputs (MB)"]):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens N")
                ax.set_title(f"{device} {shape}: {title}")
            axes[0].legend(fontsize=7)
            fig.tight_layout()
            png = RESULTS / f"fused_{device}_{shape}.png"
            fig.savefig(png, dpi=110)
            plt.close(fig)
            lines += [f"![{device} {shape}](../bench/results/{png.name})", ""]
    write_section("fused", "\n".join(lines))


def _ratios(cell: list[dict], ns: list[int]) -> str:
    """Ratios of fused_sft (and the top-k methods) to the baselines, per N."""

    def get(impl, n, key):
        r = next((r for r in cell if int(r["n"]) == n and r["impl"] == impl and not r["error"]), None)
        return float(r[key]) if r else None

    out = ["| ratio | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    pairs = [
        ("time fused_sft / gemm", "fused_sft", "gemm", "time_s"),
        ("time fused_sft / torch_lce", "fused_sft", "torch_lce", "time_s"),
        ("time fused_sft / trl", "fused_sft", "trl", "time_s"),
        ("time fused_sft / naive", "fused_sft", "naive", "time_s"),
        ("time target_sft_top64 / fused_sft", "fused_target_sft_top64", "fused_sft", "time_s"),
        ("memory fused_sft / torch_lce", "fused_sft", "torch_lce", "peak_mb"),
        ("memory fused_sft / naive", "fused_sft", "naive", "peak_mb"),
        ("memory target_sft_top64 / fused_sft", "fused_target_sft_top64", "fused_sft", "peak_mb"),
    ]
    for name, a, b, key in pairs:
        vals = []
        for n in ns:
            x, y = get(a, n, key), get(b, n, key)
            vals.append(f"{x / y:.2f}" if x is not None and y else "")
        out.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "N", "H", "V"))
    ap.add_argument("--device", default="cuda" if os.environ.get("BENCH_CUDA") else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", action="store_true", help="only redraw the plot and table from the CSV")
    ap.add_argument("--impls", nargs="*", default=[i for i in IMPLS if i != "liger"])
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, choices=list(SHAPES))
    ap.add_argument("--n", type=int, nargs="*", help="token counts (default: each shape's grid)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="of the hidden states and the lm_head")
    ap.add_argument("--csv", type=Path, default=CSV_PATH, help="rows go here (default bench/results/fused.csv)")
    ap.add_argument("--no-report", action="store_true", help="leave the plots and docs/benchmarks.md alone")
    args = ap.parse_args()
    if args.worker:
        impl, n, h, v = args.worker
        print(json.dumps(worker(impl, int(n), int(h), int(v), args.device, args.reps, args.dtype)))
        return
    if not args.report:
        run_grid(args.device, args.quick, args.impls, args.shapes, args.csv, args.n, args.dtype)
    if not args.no_report:
        report()


if __name__ == "__main__":
    main()
