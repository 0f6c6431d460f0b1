"""Sphinx extension: number equations by chapter, "(4.3)" for the third labelled equation of chapter 4.

The chapters carry their number in their title ("# 4. Predicting the noise ...", "# A. A zoo ...").
Sphinx numbers labelled equations through ``env.toc_fignumbers`` when ``numfig`` and ``math_numfig``
are on (jupyter-book turns ``numfig`` on); without a numbered toctree those numbers run on across the
whole book. This extension replaces each chapter's equation numbers by (chapter, k), k counting the
chapter's labelled equations in document order, so that the number shown next to an equation and the
text of every ``{eq}`` reference to it (from any page) read "(4.3)". Pages without a chapter number in
their title (the introduction, the API reference) keep Sphinx's numbers.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

CHAPTER_TITLE = re.compile(r"^\s*(\d+|[A-Z])\.\s")  # "4. Title" -> "4", "A. Title" -> "A"


def chapter_of(doctree: nodes.document) -> str | None:
    """The chapter number of a page from its first title, or None."""
    for title in doctree.findall(nodes.title):
        match = CHAPTER_TITLE.match(title.astext())
        return match.group(1) if match else None
    return None


def record_equations(app: Sphinx, doctree: nodes.document) -> None:
    """After a page is read: remember its chapter and the ids of its labelled equations, in order."""
    env = app.env
    docname = env.docname
    chapter = chapter_of(doctree)
    ids = [node["ids"][0] for node in doctree.findall(nodes.math_block) if node.get("label") and node["ids"]]
    store = _store(env)
    store.pop(docname, None)
    if chapter is not None and ids:
        store[docname] = (chapter, ids)


def number_by_chapter(app: Sphinx, env: BuildEnvironment) -> list[str]:
    """After Sphinx assigned its figure numbers: give each chapter's equations (chapter, k)."""
    changed = []
    for docname, (chapter, ids) in _store(env).items():
        numbers = {eq_id: (int(chapter) if chapter.isdigit() else chapter, k) for k, eq_id in enumerate(ids, 1)}
        per_type = env.toc_fignumbers.setdefault(docname, {})
        if per_type.get("displaymath") != numbers:
            per_type["displaymath"] = numbers
            changed.append(docname)
    return changed


def purge(app: Sphinx, env: BuildEnvironment, docname: str) -> None:
    _store(env).pop(docname, None)


def merge(app: Sphinx, env: BuildEnvironment, docnames: set[str], other: BuildEnvironment) -> None:
    for docname in docnames:
        if docname in _store(other):
            _store(env)[docname] = _store(other)[docname]


def _store(env: BuildEnvironment) -> dict[str, tuple[str, list[str]]]:
    if not hasattr(env, "tinyddpm_chapter_equations"):
        env.tinyddpm_chapter_equations = {}
    return env.tinyddpm_chapter_equations


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-read", record_equations)
    # Sphinx's own figure numbering runs on env-get-updated at the default priority (500): go after it.
    app.connect("env-get-updated", number_by_chapter, priority=900)
    app.connect("env-purge-doc", purge)
    app.connect("env-merge-info", merge)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
