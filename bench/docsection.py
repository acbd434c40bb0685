"""Each benchmark owns one section of ``docs/benchmarks.md``, between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``; rewriting it leaves the other sections alone."""

from __future__ import annotations

import os
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_csv_section(name: str, intro: str, csv_path: Path, fields: list[str]) -> None:
    """Section ``name``: ``intro``, then the rows of ``csv_path`` as a table of ``fields`` (or a line saying no GPU
    machine has run it yet, when there are none)."""
    import csv

    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    lines = [intro, ""]
    if not rows:
        lines.append("Pending: no GPU machine has run it yet.")
    else:
        lines += ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
        lines += ["| " + " | ".join(str(r[k]) for k in fields) + " |" for r in rows]
    write_section(name, "\n".join(lines))


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace section ``name`` of ``doc`` with ``body`` (append it, or create the file, when missing); atomic."""
    start, end = markers(name)
    text = f"{start}\n{body.strip()}\n{end}"
    doc.parent.mkdir(parents=True, exist_ok=True)
    old = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if start in old and end in old and old.index(start) < old.index(end):
        new = old[: old.index(start)] + text + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)
    print(f"updated the {name} section of {doc}")
