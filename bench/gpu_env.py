"""Step 0 of ``bench/gpu_check.sh``: what this machine has for the acceptance run, and what it lacks.

Prints each package the run uses (found, with its version and whether it came from the carried wheels, or missing,
with the step that needs it) and the device; without ``--dry-run`` also writes ``OUT/environment.json``.

    python bench/gpu_env.py OUT [--dry-run] [--site DIR]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

NEEDS = {
    "torch": "every step",
    "transformers": "steps 1 and 3",
    "accelerate": "step 3",
    "pytest": "step 1",
    "hypothesis": "step 1",
    "trl": "steps 2 and 3 (TRL baselines)",
    "datasets": "step 3 (TRL's SFTTrainer)",
    "liger_kernel": "step 2 (Liger baseline; needs Triton)",
    "cut_cross_entropy": "step 2 (CCE baseline; needs Triton)",
    "triton": "Liger and CCE",
    "matplotlib": "nothing required (plots are drawn where the CSVs are read)",
}
DISTRIBUTION = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}


def _in_wheels() -> dict[str, str]:
    """Distribution name → version of what ``.whl/requirements.txt`` lists."""
    req = Path(__file__).resolve().parents[1] / ".whl" / "requirements.txt"
    lines = req.read_text().split() if req.is_file() else []
    return dict(line.lower().split("==", 1) for line in lines)


def probe(site: Path | None, dry_run: bool) -> dict:
    found, missing, carried = {}, {}, []
    wheels = _in_wheels()
    for module, use in NEEDS.items():
        dist = DISTRIBUTION.get(module, module)
        try:
            if dry_run:  # the wheels are not installed in a dry run: look without importing
                if importlib.util.find_spec(module) is None:
                    raise ImportError(module)
            else:
                importlib.import_module(module)
            version = metadata.version(dist)
        except Exception as e:  # noqa: BLE001 - a package that fails to import is as missing as an absent one
            if dry_run and dist in wheels:
                found[module] = f"{wheels[dist]} (in .whl/, installed by the run)"
            else:
                missing[module] = f"{use}; {type(e).__name__}: {e}"[:200]
            continue
        spec = importlib.util.find_spec(module)
        origin = str(spec.origin or "") if spec else ""
        from_site = site is not None and origin.startswith(str(site))
        found[module] = version + (" (carried)" if from_site else "")
        if from_site:
            carried.append(f"{dist}=={version}")
    return {"found": found, "missing": missing, "carried": carried}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--site", type=Path, help="where the carried wheels were installed")
    args = ap.parse_args()
    import torch

    result = probe(args.site.resolve() if args.site else None, args.dry_run)
    for module, version in result["found"].items():
        print(f"  {module:18s} found {version}")
    for module, why in result["missing"].items():
        print(f"  {module:18s} MISSING   ({why})")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "NOT AVAILABLE"
    print(f"  cuda               {device}")
    env = {
        "device": device if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": result["found"].get("transformers", "missing"),
        "cuda": torch.version.cuda,
        "carried": result["carried"],
    }
    if not args.dry_run:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "environment.json").write_text(json.dumps({**env, **result}, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
