"""tools/browser_check.py must pass a good page and catch each planted defect.

No book is built: a tiny hand-written site (with the vendored MathJax 3 of ``sphinx-mathjax-offline``)
is served locally and opened in headless Chromium. Skipped where Debian's ``chromium`` /
``chromium-driver`` or Selenium are missing (CI installs them).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("browser_check", ROOT / "tools" / "browser_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("browser_check", module)
    spec.loader.exec_module(module)
    return module


bc = _load_tool()
_MISSING = bc.browser_available()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"browser check needs Chromium: {_MISSING}")

_HEAD = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>{extra}</head>
<body style="width: 900px">{body}</body></html>"""
_MATHJAX = ('<script>window.MathJax = {"options": {"processHtmlClass": "math"}}</script>'
            '<script defer src="_static/mathjax/tex-chtml.js"></script>')
_MATH = ('<p>Inline <span class="math notranslate nohighlight">\\(\\sqrt{\\bar\\alpha_t}\\, x_0\\)</span>.</p>'
         '<div class="math notranslate nohighlight">\\[ q(x_t \\mid x_0) = \\mathcal{N}(x_t; '
         '\\sqrt{\\bar\\alpha_t} x_0, (1 - \\bar\\alpha_t) I) \\]</div>')

PAGES = {
    "good.html": (_MATHJAX, _MATH + '<img src="img.png" alt="a figure"><a href="other.html#sec">next</a>'
                  '<pre>x = 1  # a short line</pre>'),
    "other.html": ("", '<h1 id="sec">Section</h1><a href="good.html">back</a>'),
    "bad_math.html": ("", _MATH),  # no MathJax on the page: the TeX stays raw
    "bad_image.html": ("", '<img src="missing.png" alt="gone">'),
    "bad_link.html": ("", '<a href="nowhere.html">a missing page</a> <a href="other.html#nosuch">a missing anchor</a>'),
    "wide_pre.html": ("", '<pre style="width: 300px; overflow-x: auto">' + "y = 0  # " + "z" * 200 + "</pre>"),
    "wide_math.html": (_MATHJAX, '<div style="width: 300px"><div class="math notranslate nohighlight">\\[ '
                       + " + ".join(f"a_{{{k}}} x^{{{k}}}" for k in range(40)) + " \\]</div></div>"),
    "console.html": ("<script>console.error('planted error')</script>", "<p>text</p>"),
    "network.html": ('<script src="https://cdn.example.org/lib/index.js"></script>', "<p>text</p>"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny site: good pages, one page per planted defect, a PNG and MathJax 3 in _static."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sphinx-mathjax-offline (the vendored MathJax 3) is not installed")
    mathjax = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax"
    root = tmp_path_factory.mktemp("site")
    (root / "_static").mkdir()
    (root / "_static" / "mathjax").symlink_to(mathjax, target_is_directory=True)
    from PIL import Image

    Image.new("L", (8, 8), 128).save(root / "img.png")
    (root / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=good.html" />')
    for name, (extra, body) in PAGES.items():
        (root / name).write_text(_HEAD.format(title=name, extra=extra, body=body), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def report(site: Path):
    return bc.check_site(site, screenshots=site.parent / "shots", screenshot_pages=("good",), log=False)


def kinds(report, page: str) -> list[str]:
    return sorted(p.kind for p in report.problems if p.page == page)


def test_every_page_was_opened_and_the_redirect_followed(report) -> None:
    assert sorted(report.pages) == sorted(PAGES)  # index.html redirects: checked, not opened
    assert not [p for p in report.problems if p.page == "index.html"]


def test_good_pages_pass(report) -> None:
    assert kinds(report, "good.html") == [], [str(p) for p in report.problems if p.page == "good.html"]
    assert kinds(report, "other.html") == []
    assert [s.name for s in report.screenshots] == ["good.png"] and report.screenshots[0].stat().st_size > 1000


def test_unrendered_math_fails(report) -> None:
    found = [p for p in report.problems if p.page == "bad_math.html"]
    assert {p.kind for p in found} == {"math"}
    assert any("unrendered equation" in p.detail for p in found)
    assert any("raw TeX" in p.detail and "\\(" in p.detail for p in found)


def test_broken_image_fails(report) -> None:
    found = kinds(report, "bad_image.html")
    assert "image" in found  # naturalWidth 0; the 404 also shows as a console error
    assert set(found) <= {"image", "console"}


def test_broken_links_fail(report) -> None:
    details = [p.detail for p in report.problems if p.page == "bad_link.html"]
    assert kinds(report, "bad_link.html") == ["link", "link"]
    assert any("no file nowhere.html" in d for d in details) and any("no anchor #nosuch" in d for d in details)


def test_horizontal_scroll_fails(report) -> None:
    found = [p for p in report.problems if p.page == "wide_pre.html"]
    assert [p.kind for p in found] == ["scroll"] and "209 chars" in found[0].detail


def test_wide_display_equation_fails(report) -> None:
    found = [p for p in report.problems if p.page == "wide_math.html"]
    assert [p.kind for p in found] == ["scroll"] and "display equation" in found[0].detail
    assert "a_{0} x^{0}" in found[0].detail  # names the equation by its TeX


def test_console_error_and_network_use_fail(report) -> None:
    assert kinds(report, "console.html") == ["console"]
    assert "console" in kinds(report, "network.html")  # no host but 127.0.0.1 resolves


def test_warn_flag_reports_without_failing(report) -> None:
    wide = bc.Report(problems=[p for p in report.problems if p.page == "wide_pre.html"])
    assert wide.failed() and not wide.failed(warn=["scroll"])
    assert bc.Report(problems=list(report.problems)).failed(warn=["scroll"])  # the other kinds still fail


def test_exit_status(site: Path) -> None:
    assert bc.main([str(site), "--page", "good.html", "--screenshots", str(site.parent / "s1")]) == 0
    assert bc.main([str(site), "--page", "wide_pre.html", "--screenshots", str(site.parent / "s2")]) == 1
