"""mkdocs hooks: pages that show generated tables (the methods table from the registry, the config reference from
the config dataclasses), the repository's plots (``bench/results``, ``results/``) served beside the pages that
show them, so that one image path works on GitHub and on the site, and formulas (``$…$``, ``$$…$$``) rendered to
MathML when the site is built, so that the pages show them with no script and no network."""

from __future__ import annotations

import dataclasses
import html
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
IMAGE_DIRS = ("bench/results", "results")


def methods_markdown() -> str:
    import targetsft

    return targetsft.methods_table()


def _type_name(tp: object) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return str(text).replace("typing.", "").replace("|", "or")


def config_markdown() -> str:
    """One table per section of ``TrainConfig``: field, type, default; then the section's docstring."""
    from targetsft.training import config as C

    sections = [("top level", C.TrainConfig)] + [(name, cls) for name, cls in C._SECTIONS.items()]
    out = []
    for name, cls in sections:
        out += [f"### `{name}`" if name != "top level" else "### Top level", ""]
        doc = " ".join(line.strip() for line in (cls.__doc__ or "").strip().splitlines())
        doc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", doc.replace("``", "`"))  # Sphinx roles as code
        out += [doc, "", "| key | type | default |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
                default = "section" if dataclasses.is_dataclass(value) else repr(value)
            else:
                default = "required"
            out.append(f"| `{f.name}` | `{_type_name(f.type)}` | `{default}` |")
        out.append("")
    out += ["`train` takes any `transformers.TrainingArguments` field; what targetsft sets unless told otherwise:", ""]
    out += ["| key | default |", "|---|---|"] + [f"| `{k}` | `{v!r}` |" for k, v in C.TRAIN_DEFAULTS.items()]
    return "\n".join(out) + "\n"


def changelog_markdown() -> str:
    text = (ROOT / "CHANGELOG.md").read_text()
    return text.split("\n", 1)[1]  # its own title is the page's


MARKERS = {
    "<!-- methods-table -->": methods_markdown,
    "<!-- config-reference -->": config_markdown,
    "<!-- changelog -->": changelog_markdown,
}


def on_files(files: Files, config) -> Files:
    """Serve the plots of ``bench/results`` and ``results`` at the same paths below the site root."""
    for folder in IMAGE_DIRS:
        for png in sorted((ROOT / folder).rglob("*.png")):
            rel = png.relative_to(ROOT).as_posix()
            files.append(File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=False))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, make in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    # the pages sit in docs/, the plots one level up: ../bench/results/x.png is bench/results/x.png on the site
    return re.sub(r"\]\(\.\./(bench/results|results)/", r"](\1/", markdown)


# pymdownx.arithmatex (generic mode) wraps each formula: inline in <span class="arithmatex">\(…\)</span>, display in
# <div class="arithmatex">\[…\]</div>, the TeX HTML-escaped
_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*\\(?P<open>[(\[])(?P<tex>.*?)\\[)\]]\s*</(?P=tag)>', re.DOTALL
)


def render_math(page_html: str) -> str:
    """Each arithmatex formula of ``page_html`` as MathML (``latex2mathml``), display formulas as blocks."""
    from latex2mathml.converter import convert

    def mathml(match: re.Match) -> str:
        display = "block" if match["open"] == "[" else "inline"
        rendered = convert(html.unescape(match["tex"]).strip(), display=display)
        return f'<div class="math">{rendered}</div>' if display == "block" else rendered

    return _MATH.sub(mathml, page_html)


def on_page_content(page_html: str, page, config, files) -> str:
    return render_math(page_html)
