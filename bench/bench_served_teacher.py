"""A training step against a served teacher, side by side with the same teacher online and from a top-k cache.

``target-sft train`` (Target-SFT, η = 0.5) of the embedded SmolLM2-135M-Instruct on GSM-style records, with the same
model as teacher three ways: ``online`` (``teacher.model``, its forward in the student's process), ``cache``
(``teacher.cache``, a top-64 cache built from the server beforehand) and ``served`` (``teacher.server``, a vLLM server
on 127.0.0.1 started here through ``target-sft serve-teacher``'s command, or ``--url`` of one already up). Each run
times its optimizer steps with a callback; the arms alternate over ``--repeats`` rounds so that drift touches all
three. On one CPU the server computes on the cores the student trains on, so the served step includes the teacher's
forward as the online one does; on a GPU box the server has devices of its own. Rows go to
``bench/results/served_teacher.csv`` with the CPU capability, and the ``served_teacher`` section of
``docs/benchmarks.md`` is written from them. Run it alone on the machine.

    python bench/bench_served_teacher.py            # about 15 min on a 2-core AVX512 CPU
    python bench/bench_served_teacher.py --report   # rewrite the docs section from the CSV
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from docsection import write_section
from timing import append_rows

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "served_teacher.csv"
MODEL = "smollm2-135m-instruct"
FIELDS = [
    "date",
    "cpu_capability",
    "threads",
    "torch",
    "teacher",
    "batch_size",
    "warmup_steps",
    "timed_steps",
    "median_step_s",
    "vs_cache",
]


def _config(out: Path, teacher: list[str], batch_size: int, steps: int):
    from targetsft.training.config import load_config

    return load_config(
        None,
        [
            f"output_dir={out}",
            "loss.method=target_sft",
            "loss.params.eta=0.5",
            "precision=fp32",
            f"data.size={batch_size * steps}",
            "data.max_length=512",
            f"train.max_steps={steps}",
            f"train.per_device_train_batch_size={batch_size}",
            "train.save_steps=1000",
            "train.report_to=[]",
            "train.disable_tqdm=true",
            *teacher,
        ],
    )


def _step_times(cfg) -> list[float]:
    from transformers import TrainerCallback

    from targetsft.training.recipe import train

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    train(cfg, callbacks=[timer], keep_checkpoints=False)
    return timer.times


def _start_server(url: str) -> subprocess.Popen:
    from targetsft.cli.serve_teacher import server_command, server_environment
    from targetsft.training.config import load_config

    cfg = load_config(None, ["loss.method=target_sft", f"teacher.server.url={url}", f"teacher.server.model={MODEL}",
                             "teacher.dtype=float32"])  # fmt: skip
    env = {**server_environment(), "VLLM_CPU_KVCACHE_SPACE": "1"}  # a 1 GiB KV cache: room beside the student
    command = server_command(cfg, ["--enforce-eager"])
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )


def _wait(url: str, proc: subprocess.Popen | None) -> None:
    from targetsft.training.served_teacher import TeacherServer, TeacherServerError

    deadline = time.monotonic() + 900
    while True:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited with {proc.returncode}")
        try:
            TeacherServer(url, retries=0, timeout=5).models()
            return
        except TeacherServerError:
            if time.monotonic() > deadline:
                raise SystemExit("the vLLM server did not come up in 15 minutes") from None
            time.sleep(2)


def _measure(url: str, opts: argparse.Namespace) -> list[dict]:
    from targetsft.runtime.models import resolve_model
    from targetsft.training.recipe import cache_teacher

    steps = opts.warmup + opts.steps
    served = [f"teacher.server.url={url}", f"teacher.server.model={MODEL}"]
    times: dict[str, list[float]] = {"online": [], "cache": [], "served": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache_teacher(_config(Path(tmp) / "c", served, opts.batch_size, steps), cache, k=64)
        arms = {
            "online": [f"teacher.model={resolve_model(None)}"],
            "cache": [f"teacher.cache={cache}"],
            "served": served,
        }
        for rep in range(opts.repeats):
            for name, teacher in arms.items():
                run = _step_times(_config(Path(tmp) / f"{name}-{rep}", teacher, opts.batch_size, steps))
                times[name] += run[opts.warmup :]
                print(name, rep, [round(t, 2) for t in run], flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return [
        {
            "teacher": name,
            "batch_size": opts.batch_size,
            "warmup_steps": opts.warmup,
            "timed_steps": len(times[name]),
            "median_step_s": round(medians[name], 3),
            "vs_cache": round(medians[name] / medians["cache"], 3),
        }
        for name in times
    ]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the docs section from the CSV")
    parser.add_argument("--url", help="a vLLM server of the embedded model already up (served as " + MODEL + ")")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    if not opts.report:
        proc = None
        url = opts.url
        if url is None:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{s.getsockname()[1]}"
            proc = _start_server(url)
        try:
            _wait(url, proc)
            rows = _measure(url, opts)
        finally:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
        common = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        append_rows(CSV_PATH, FIELDS, [{**common, **row} for row in rows])
    report()


def report() -> None:
    with CSV_PATH.open() as f:
        rows = list(csv.DictReader(f))
    latest = rows[-1]["date"] if rows else ""
    rows = [r for r in rows if r["date"] == latest]
    lines = [
        "## A served teacher",
        "",
        "Generated by `python bench/bench_served_teacher.py`: `target-sft train` (Target-SFT, η = 0.5, float32) of the "
        "embedded SmolLM2-135M-Instruct with the same model as teacher online, from a top-64 cache, and served by "
        "vllm-cpu on 127.0.0.1 (top-64 prompt log-probs, requests started when a batch is collated); the median "
        "optimizer step after the warm-up, arms alternating. The server shares the CPU with the student here, so "
        "the served step pays for the teacher's forward as the online step does.",
        "",
        "| CPU | threads | teacher | batch | timed steps | median step s | vs cache |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cpu_capability']} | {r['threads']} | {r['teacher']} | {r['batch_size']} | {r['timed_steps']} | "
            f"{r['median_step_s']} | {float(r['vs_cache']):.2f}× |"
        )
    write_section("served_teacher", "\n".join(lines))


if __name__ == "__main__":
    main()
