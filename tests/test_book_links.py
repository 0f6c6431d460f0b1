"""The book and the package point at each other: equation labels in docstrings, back-links in chapters.

A docstring that implements a labelled equation of the book cites it as :eq:`eq-name` (the API page
then links to the equation, numbered "(4.3)" by ``book/_ext/chapter_equations.py``), and the chapter
that defines the equation links back to the package with a ``{py:...}`` role. These tests read the
notebooks and the package source only (no book build).
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PACKAGE = sorted((ROOT / "tinyddpm").rglob("*.py"))

LABEL_DEF = re.compile(r"\$\$\s*\((eq-[\w-]+)\)")          # $$ ... $$ (eq-name)
EQ_REF = re.compile(r"\{eq\}`(eq-[\w-]+)`")                  # {eq}`eq-name` in a chapter
DOC_EQ = re.compile(r":eq:`(eq-[\w-]+)`")                    # :eq:`eq-name` in a docstring
PY_ROLE = re.compile(r"\{py:\w+\}`~?([\w.]+)`")              # {py:func}`tinyddpm.name`
TITLE = re.compile(r"^# (\d+|[A-Z])\. \S")                   # "# 4. Title", "# A. Title"


def markdown(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def label_owners() -> dict[str, list[str]]:
    owners: dict[str, list[str]] = defaultdict(list)
    for nb in NOTEBOOKS:
        for label in LABEL_DEF.findall(markdown(nb)):
            owners[label].append(nb.stem)
    return owners


def docstring_citations() -> dict[str, set[str]]:
    """label -> names of the functions/classes/methods whose docstrings cite it (for a module's docstring:
    the module and its public top-level functions and classes)."""
    cited: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node) or ""
                if isinstance(node, ast.Module):  # a module cites for what it defines
                    names = {path.stem} | {d.name for d in node.body
                                           if isinstance(d, (ast.FunctionDef, ast.ClassDef))
                                           and not d.name.startswith("_")}
                else:
                    names = {node.name}
                for label in DOC_EQ.findall(doc):
                    cited[label] |= names
    return cited


def test_equation_labels_are_unique_across_the_book():
    dup = {label: chs for label, chs in label_owners().items() if len(chs) > 1}
    assert not dup, f"equation labels defined in more than one chapter: {dup}"


def test_every_eq_reference_in_a_chapter_resolves():
    owners = label_owners()
    broken = {nb.stem: sorted(set(EQ_REF.findall(markdown(nb))) - set(owners)) for nb in NOTEBOOKS}
    assert not {k: v for k, v in broken.items() if v}, f"{{eq}} references to undefined labels: {broken}"


def test_docstrings_cite_labels_the_book_defines():
    owners = label_owners()
    cited = docstring_citations()
    assert len(cited) >= 30, "the package should cite the book's equations in its docstrings"
    unknown = {label: sorted(names) for label, names in cited.items() if label not in owners}
    assert not unknown, f"docstrings cite equation labels no chapter defines: {unknown}"


def test_no_plain_text_labels_left_in_docstrings():
    """A label written as plain text, "(eq-v)", is not a link on the API page: use :eq:`eq-v`."""
    plain = re.compile(r"(?<![`\w-])eq-[a-z0-9]+(?:-[a-z0-9]+)*(?![\w*`-])")
    found = []
    for path in PACKAGE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                found += [f"{path.name}:{getattr(node, 'name', '<module>')}: {m}"
                          for m in plain.findall(ast.get_docstring(node) or "")]
    assert not found, "plain-text equation labels in docstrings:\n" + "\n".join(found)


def test_each_cited_equation_links_back_to_the_package():
    """The chapter that defines an equation some docstring implements names one of those objects."""
    owners = label_owners()
    missing = {}
    for label, names in docstring_citations().items():
        if label not in owners:
            continue
        chapter = owners[label][0]
        text = markdown(ROOT / "notebooks" / f"{chapter}.ipynb")
        linked = {target.split(".")[-1] for target in PY_ROLE.findall(text)}
        if not names & linked:
            missing[label] = (chapter, sorted(names))
    assert not missing, f"equations implemented in the package without a {{py:...}} link in their chapter: {missing}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_titles_are_numbered(nb: Path):
    first = json.loads(nb.read_text(encoding="utf-8"))["cells"][0]
    title = "".join(first["source"]).splitlines()[0]
    assert TITLE.match(title), f"{nb.name}: the title {title!r} should read '# N. Title' (or '# A. Title')"


def test_the_chapter_equation_extension_is_configured():
    config = (ROOT / "_config.yml").read_text(encoding="utf-8")
    assert "chapter_equations: _ext" in config and (ROOT / "book" / "_ext" / "chapter_equations.py").is_file()


def test_equations_are_numbered_by_chapter(tmp_path: Path):
    """Build two tiny pages with Sphinx and the book's extension: "(4.2)" on the page and in references."""
    sphinx_app = pytest.importorskip("sphinx.application")
    pytest.importorskip("myst_parser")
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'book' / '_ext')!r})\n"
        "extensions = ['myst_parser', 'chapter_equations']\n"
        "myst_enable_extensions = ['dollarmath', 'amsmath']\n"
        "numfig = True\n", encoding="utf-8")
    (src / "index.md").write_text("# Home\n\nSee {eq}`eq-b2`.\n\n```{toctree}\none\nfour\n```\n", encoding="utf-8")
    (src / "one.md").write_text("# 1. One\n\n$$ a = 1 $$ (eq-a1)\n", encoding="utf-8")
    (src / "four.md").write_text("# 4. Four\n\n$$ b = 1 $$ (eq-b1)\n\n$$ c = 1 $$\n\n$$ b = 2 $$ (eq-b2)\n\n"
                                 "Back to {eq}`eq-a1`.\n", encoding="utf-8")
    app = sphinx_app.Sphinx(str(src), str(src), str(tmp_path / "html"), str(tmp_path / "doctrees"), "html",
                            status=None, warning=None, freshenv=True)
    app.build()
    four = (tmp_path / "html" / "four.html").read_text(encoding="utf-8")
    index = (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    assert "(4.1)" in four and "(4.2)" in four and "(1.1)" in four   # the numbers shown, a reference to ch. 1
    assert "(4.2)" in index and "(3)" not in index                   # a reference from an unnumbered page
    assert "(4.3)" not in four                                       # an unlabelled equation gets no number
