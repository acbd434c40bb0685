"""The README's examples run as written, and its method table is the registry's."""

import re
from pathlib import Path

import targetsft

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    """Every ```python block of the README executes in order in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["loss"].ndim == 0
    assert namespace["Q"].shape[-1] == 49152


def test_readme_method_table_matches_registry():
    """The table in the README is exactly ``methods_table()`` (no stale method, γ, π̃ or default)."""
    assert targetsft.methods_table() in README.read_text()
