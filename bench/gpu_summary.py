"""The GPU acceptance run's short summary: ``OUT/summary.md`` from the CSVs ``bench/gpu_check.sh`` wrote in ``OUT``.

Every figure is a ratio of two rows measured in that run, on that machine: the fused loss against each peer
(time and peak memory, per shape) and each training mode against TRL's ``SFTTrainer`` (tokens/s and peak memory).

    python bench/gpu_summary.py OUT             # write OUT/summary.md and print it
    python bench/gpu_summary.py OUT --doc       # also put it in the gpu_check section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from docsection import write_section

PEERS = ["naive", "torch_lce", "trl", "liger", "cce"]
OURS = ["fused_sft", "fused_dft", "fused_target_sft_top64"]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.is_file() else []


def _num(row: dict | None, key: str) -> float | None:
    if row is None or row.get("error") or not row.get(key):
        return None
    return float(row[key])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def tests_line(out: Path) -> str:
    xml = out / "cuda_tests.xml"
    if not xml.is_file():
        return "CUDA tests: not run."
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    passed = total - failed - skipped
    return f"CUDA tests (`tests/scale/test_cuda.py`): {passed} passed, {failed} failed, {skipped} skipped."


def fused_tables(rows: list[dict]) -> list[str]:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        cell = [r for r in rows if r["shape"] == shape]
        for n in dict.fromkeys(r["n"] for r in cell):
            at = {r["impl"]: r for r in cell if r["n"] == n}
            first = next(iter(at.values()))
            lines += [
                f"**Fused loss, {shape}** (N={n}, H={first['h']}, V={first['v']}, {first.get('dtype') or 'fp32'}; "
                "forward + backward, median time):",
                "",
                "| ours | "
                + " | ".join([f"time / {p}" for p in PEERS] + [f"memory / {p}" for p in PEERS])
                + " | time s | peak MiB |",
                "|---|" + "---|" * (2 * len(PEERS) + 2),
            ]
            for ours in OURS:
                r = at.get(ours)
                t = [_ratio(_num(r, "time_s"), _num(at.get(p), "time_s")) for p in PEERS]
                m = [_ratio(_num(r, "peak_mb"), _num(at.get(p), "peak_mb")) for p in PEERS]
                own = [f"{_num(r, k):.4g}" if _num(r, k) is not None else "–" for k in ("time_s", "peak_mb")]
                lines.append(f"| {ours} | " + " | ".join(t + m + own) + " |")
            errors = {i: r["error"] for i, r in at.items() if r.get("error")}
            lines += [""] + [f"- {i} did not run: `{e}`" for i, e in errors.items()] + [""]
    return lines


def train_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["Training: not run.", ""]
    trl = next((r for r in rows if r["mode"] == "trl_nll"), None)
    r0 = rows[0]
    lines = [
        f"**Training** ({r0['size']}: {r0['params_b']}B-parameter student, teacher with {r0['teacher_vocab']} rows, "
        f"{r0['steps']} steps of {r0['batch']} × ≤{r0['seq']} tokens; tokens/s after the warm-up):",
        "",
        "| mode | tokens/s | × TRL nll | step s | peak MiB | × TRL nll | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['mode']} | failed: `{r['error']}` | | | | | |")
            continue
        tps, peak = _num(r, "tokens_per_s"), _num(r, "peak_mb")
        lines.append(
            f"| {r['mode']} | {tps:.0f} | {_ratio(tps, _num(trl, 'tokens_per_s'))} | {r['step_s']} | {peak:.0f} | "
            f"{_ratio(peak, _num(trl, 'peak_mb'))} | {r['loss']} |"
        )
    cache = next((r for r in rows if r.get("cache_build_s")), None)
    if cache:
        lines.append(f"\nThe top-64 teacher cache took {cache['cache_build_s']} s to build (not in the step times).")
    return lines + [""]


def summary(out: Path) -> str:
    env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").is_file() else {}
    head = ", ".join(f"{k} {env[k]}" for k in ("device", "python", "torch", "transformers", "cuda") if k in env)
    lines = ["# GPU acceptance run", "", f"Machine: {head or 'not recorded'}.", ""]
    if env.get("carried"):
        lines += [f"Carried wheels: {', '.join(env['carried'])}.", ""]
    if env.get("missing"):
        lines += ["Missing: " + "; ".join(f"{k} ({v})" for k, v in env["missing"].items()) + ".", ""]
    lines += [tests_line(out), ""]
    lines += fused_tables(_rows(out / "fused.csv"))
    lines += train_table(_rows(out / "train.csv"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--doc", action="store_true", help="also write the gpu_check section of docs/benchmarks.md")
    args = ap.parse_args()
    text = summary(args.out)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    if args.doc:
        write_section("gpu_check", text.replace("# GPU acceptance run", "## GPU acceptance run", 1))


if __name__ == "__main__":
    main()
