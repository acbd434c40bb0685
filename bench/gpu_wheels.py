"""Build ``.whl/``: the pure-Python packages the GPU acceptance run needs and the GPU machine's image lacks, as wheels
to carry there (it has no network; ``bench/gpu_check.sh`` installs them with ``pip --no-index --target``).

The image holds torch, transformers, accelerate, peft, pandas, pyarrow, xxhash, psutil and the rest TRL and datasets
need, but not TRL, datasets (nor their dill and multiprocess), Liger-Kernel or Cut Cross-Entropy. TRL, datasets,
dill and multiprocess are taken at the versions installed here (the ones the test suite ran with); Liger and CCE,
which need Triton and so are not installed on this CPU machine, at ``PINNED``. Wheels are fetched for the GPU
image's Python (3.12, manylinux x86-64) and, where it differs, for the Python running this script (the CPU
rehearsal). Beside them, ``tokenizer/``: the embedded SmolLM2 tokenizer (the model package is not carried; the run
builds random-weight models). The folder must stay under 64 MiB, what one device run may carry.

    python bench/gpu_wheels.py            # download into .whl/ (a PyPI index must be reachable), check the size
    python bench/gpu_wheels.py --check    # only check what is there (exit 1 when missing or over the limit)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LIMIT_MIB = 64
FROM_HERE = ["trl", "datasets", "dill", "multiprocess"]  # at the versions installed here
PINNED = {"liger-kernel": "0.8.5", "cut-cross-entropy": "25.1.1"}
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "none"]
TARGET += [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "any")]


def requirements() -> list[str]:
    """``name==version`` of every wheel to carry."""
    missing = []
    reqs = []
    for name in FROM_HERE:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"not installed here, so no tested version to carry: {', '.join(missing)} (bash setup.sh)")
    return reqs + [f"{name}=={version}" for name, version in PINNED.items()]


def size_mib(folder: Path = WHEELS) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def check(folder: Path = WHEELS) -> list[str]:
    """Problems with ``folder`` (none: every requirement has a wheel and the folder is under the limit)."""
    req = folder / "requirements.txt"
    if not req.is_file():
        return [f"{req} is missing: run python bench/gpu_wheels.py"]
    problems = [] if (folder / "tokenizer" / "tokenizer.json").is_file() else [f"no tokenizer in {folder}"]
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in folder.glob("*.whl")}
    for line in req.read_text().split():
        if line.split("==")[0].lower() not in names:
            problems.append(f"no wheel for {line}")
    if size_mib(folder) > LIMIT_MIB:
        problems.append(f"{folder} holds {size_mib(folder):.1f} MiB, over the {LIMIT_MIB} MiB one run may carry")
    return problems


def download(folder: Path = WHEELS) -> None:
    reqs = requirements()
    folder.mkdir(exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    subprocess.run(base + TARGET + reqs, check=True)
    if sys.version_info[:2] != (3, 12):  # the rehearsal's own Python: a wheel tagged per version (multiprocess)
        subprocess.run(base + reqs, check=True)
    from targetsft.runtime.models import load_tokenizer, resolve_model

    load_tokenizer(resolve_model(None)).save_pretrained(folder / "tokenizer")
    (folder / "requirements.txt").write_text("\n".join(reqs) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=WHEELS)
    ap.add_argument("--check", action="store_true", help="only check the folder")
    args = ap.parse_args()
    if not args.check:
        download(args.dir)
    problems = check(args.dir)
    for p in problems:
        print(f"gpu_wheels: {p}", file=sys.stderr)
    wheels = sorted(w.name for w in args.dir.glob("*.whl"))
    print(f"{args.dir}: {len(wheels)} wheels, {size_mib(args.dir):.1f} MiB (limit {LIMIT_MIB} MiB)")
    for w in wheels:
        print(f"  {w}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
