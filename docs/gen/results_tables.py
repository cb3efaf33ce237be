"""Benchmark tables for the kernels-and-speed page, read from the repository.

The summary table is the one under "What it measures" in README.md; the
others are the tables (and their date/device/command lines) of named
sections of bench/RESULTS.md, found by the start of their heading, so a
re-measured section with a new date is still found.
"""

from __future__ import annotations

from pathlib import Path

#: file name of the generated snippet -> (file, heading start)
SECTIONS = {
    "summary": ("README.md", "## What it measures"),
    "kernels": ("bench/RESULTS.md", "## Triton kernels"),
    "unsloth": ("bench/RESULTS.md", "## Projection outputs kept for the recompute"),
    "packing": ("bench/RESULTS.md", "### Throughput: 1B-shaped Llama"),
}


#: the bullet lines of a section that say how it was measured
FACTS = ("- date:", "- GPU:", "- versions:", "- command:")


def section_tables(text: str, heading: str) -> str:
    """The how-measured bullet lines and the tables of the section whose heading starts with ``heading``."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        raise LookupError(f"no section starting with {heading!r}")
    level = len(heading) - len(heading.lstrip("#"))
    kept = [f"*{lines[start].lstrip('#').strip()}*", ""]
    for line in lines[start + 1:]:
        if line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
            break
        if line.startswith("|") or line.startswith(FACTS):
            kept.append(line)
        elif kept[-1] != "":
            kept.append("")  # a blank line between a bullet list and a table, and between tables
    return "\n".join(kept).strip() + "\n"


def generate(root: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (file, heading) in SECTIONS.items():
        path = out_dir / f"results-{name}.md"
        path.write_text(section_tables((root / file).read_text(), heading))
        written.append(path)
    return written
