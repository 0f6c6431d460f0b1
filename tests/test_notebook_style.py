"""Every chapter meets the book's style (issue 13): no committed outputs, code that fits the page,
math in LaTeX rather than Unicode in the prose, sections numbered by chapter, exercises at the end
with checked solutions.

These read the notebook files only; executing them is nbval's job (CI runs every chapter).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_CODE_LINE = 88          # what a code block shows without scrolling at the book's default width
# Math written as Unicode in prose: Greek letters, operators and super/subscripts that belong in $...$.
UNICODE_MATH = re.compile(r"[αβγδεζηθκλμνξπρστφχψωΓΔΘΛΞΠΣΦΨΩ∑∏√∇∫∂≈≠≤≥±∞‖⊙ᾱ²³⁻₀₁₂ₜ]")


def cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def prose(text: str) -> str:
    """Markdown without code fences, inline code and math (what is left is read as text)."""
    text = re.sub(r"```[^\n]*\n.*?```", lambda m: "" if not m.group(0).startswith("```{admonition")
                  else m.group(0).split("\n", 1)[1], text, flags=re.DOTALL)
    text = re.sub(r"\$\$.*?\$\$", "", text, flags=re.DOTALL)
    text = re.sub(r"\$[^$\n]+\$", "", text)
    text = re.sub(r"``.*?``|`[^`\n]*`", "", text)
    return text


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(nb: Path):
    dirty = [i for i, c in enumerate(cells(nb))
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{nb.name}: cells {dirty} carry outputs; the book build executes the notebooks"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_lines_fit_the_page(nb: Path):
    long = [(i, len(line)) for i, c in enumerate(cells(nb)) if c["cell_type"] == "code"
            for line in source(c).splitlines() if len(line) > MAX_CODE_LINE]
    assert not long, f"{nb.name}: (cell, length) of code lines over {MAX_CODE_LINE} characters: {long}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_math_in_prose_is_latex(nb: Path):
    found = []
    for i, c in enumerate(cells(nb)):
        if c["cell_type"] == "markdown":
            for line in prose(source(c)).splitlines():
                if UNICODE_MATH.search(line):
                    found.append(f"cell {i}: {line.strip()[:100]}")
    assert not found, f"{nb.name}: Unicode math in prose (write it in $...$):\n" + "\n".join(found[:20])


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_sections_are_numbered_by_chapter(nb: Path):
    """"# 4. Title" heads the chapter; its sections are "## 4.1 ...", "## 4.2 ...", in order, except
    the closing "## Summary" and "## Exercises" (a reader can find "section 4.2" by its number)."""
    text = "\n".join(source(c) for c in cells(nb) if c["cell_type"] == "markdown")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # headings inside code fences are not ours
    title = re.search(r"^# (\d+|[A-Z])\. ", text, flags=re.MULTILINE)
    assert title, f"{nb.name}: no numbered title '# N. ...'"
    chapter = title.group(1)
    sections = [h for h in re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
                if h.strip() not in ("Summary", "Exercises")]
    expected = [f"{chapter}.{k}" for k in range(1, len(sections) + 1)]
    found = [h.split(" ", 1)[0] for h in sections]
    assert found == expected, f"{nb.name}: section numbers {found}, expected {expected}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_ends_with_exercises_and_checked_solutions(nb: Path):
    cs = cells(nb)
    heading = [i for i, c in enumerate(cs) if c["cell_type"] == "markdown"
               and re.search(r"^#+ .*Exercises", source(c), flags=re.MULTILINE)]
    assert heading, f"{nb.name}: no 'Exercises' section"
    after = cs[heading[-1]:]
    statements = re.findall(r"^\s*(?:\d+\.|\*\*Exercise)", source(after[0]), flags=re.MULTILINE)
    assert 2 <= len(statements) <= 4 or len(statements) == 0, f"{nb.name}: {len(statements)} exercises"
    solutions = [c for c in after if c["cell_type"] == "code" and "hide-input" in c.get("metadata", {}).get("tags", [])]
    prose_solutions = [c for c in after if c["cell_type"] == "markdown" and ":class: dropdown" in source(c)]
    assert solutions or prose_solutions, f"{nb.name}: exercises without solutions"
    for c in solutions:
        assert "assert" in source(c), f"{nb.name}: a solution cell checks nothing:\n{source(c)[:200]}"


def test_ruff_is_clean_on_the_notebooks():
    """The chapters' code follows the package's lint rules (pyproject's [tool.ruff])."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it is in the dev extra)")
    done = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "notebooks/"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
