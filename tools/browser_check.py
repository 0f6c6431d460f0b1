"""Open every page of the built book in headless Chromium and fail on what a reader would see broken.

The HTML is served by a local ``http.server`` on a free port; Chromium (Debian's ``chromium``) is
driven by Selenium through Debian's ``/usr/bin/chromedriver`` (Selenium Manager is never asked to
download anything) and resolves no host but 127.0.0.1, so a page that needs the network shows up
as a console error. Each page is checked for

* ``math``: an equation left unrendered (raw ``\\(``, ``\\[``, ``$$``, ``$\\`` or ``\\begin{`` in the
  visible text outside code, a Sphinx math element without an ``mjx-container``, a MathJax error, or
  a MathJax other than version 3 — the one vendored into ``_static/mathjax``),
* ``image``: an image that did not load (``naturalWidth == 0``),
* ``link``: an internal link to a missing file or to a missing anchor (the ``[docs]`` links of the
  ``_modules/`` source pages into ``api.html`` are not checked: viewcode names an object by its defining
  module, the API page by where ``tinyddpm`` re-exports it),
* ``scroll``: a code block that scrolls horizontally (``scrollWidth > clientWidth`` on a ``pre``;
  pages under ``_modules/``, the highlighted package sources, are exempt), or a display equation
  wider than the text column (it scrolls, or is clipped, sideways),
* ``console``: a SEVERE entry in the browser console (a failed request, a script error).

All problems are listed; the exit status is 1 if any kind not in ``--warn`` occurred. Screenshots of
a few chapters go to ``--screenshots`` for a person to look at.

Usage::

    python tools/browser_check.py book/_build/html [--screenshots book/_build/screenshots] [--warn scroll]
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

KINDS = ("math", "image", "link", "scroll", "console")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Chapters photographed by default (matched against the page's file name); the home page as well.
SCREENSHOT_PAGES = ("intro", "01_", "03_", "06_", "09_", "12_")
WIDTH, HEIGHT = 1440, 900  # a common laptop width; the book's code column then fits 89 characters
MAX_SHOT_HEIGHT = 6000
# Console errors that are known, harmless and not ours to fix, each with its reason. Keep this short.
KNOWN_CONSOLE_ERRORS: dict[str, str] = {
    "Identifier 'THEBE_JS_URL' has already been declared":
        "Sphinx 7.4 emits inline scripts registered after the builder starts twice (filename None vs ''), "
        "so sphinx-thebe's `const THEBE_JS_URL` config script appears twice; the first one works and "
        "thebe is off in this book",
}


@dataclass
class Problem:
    """One thing wrong on one page."""

    page: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.page}: [{self.kind}] {self.detail}"


@dataclass
class Report:
    """Everything the check found; ``failed(warn)`` says whether it should fail a run."""

    pages: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def failed(self, warn: Iterable[str] = ()) -> bool:
        return any(p.kind not in set(warn) for p in self.problems)


def browser_available() -> str | None:
    """``None`` if Chromium, chromedriver and Selenium are all here, else what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return f"missing {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)" \
        if missing else None


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, quietly; the browser's own ``/favicon.ico`` request gets an empty answer."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        if urlsplit(self.path).path == "/favicon.ico" and not Path(self.translate_path(self.path)).exists():
            self.send_response(204)
            self.end_headers()
            return None
        return super().send_head()


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 at a free port; yields the base URL (with a trailing slash)."""
    handler = functools.partial(_Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium WebDriver that logs the console and reaches no host but 127.0.0.1."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


# Runs in the page: waits for MathJax's first typeset (if MathJax is on the page) and for every
# image, then measures. Returns a dict; arguments[0] says whether to check code-block scrolling.
_MEASURE_JS = r"""
const done = arguments[arguments.length - 1];
const checkScroll = arguments[0];
const sleep = ms => new Promise(r => setTimeout(r, ms));
(async () => {
  const out = {mathjax: null, mathjaxVersion: null, unrendered: [], merrors: 0, raw: [], images: [],
               scroll: [], wide: [], ids: []};
  const hasScript = [...document.scripts].some(s => /mathjax/i.test(s.src || ''));
  if (hasScript) {
    // MathJax is a deferred script: it has run by the load event, so a short grace period is enough.
    const t0 = Date.now();
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise) && Date.now() - t0 < 5000) {
      await sleep(50);
    }
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      try { await MathJax.startup.promise; out.mathjax = 'ok'; } catch (e) { out.mathjax = 'error: ' + e; }
      out.mathjaxVersion = MathJax.version || null;
    } else { out.mathjax = 'script on the page, but MathJax did not start (not loaded?)'; }
  }
  for (const img of document.images) { if (img.loading === 'lazy') img.loading = 'eager'; }
  await Promise.all([...document.images].map(img => img.complete ? null : new Promise(r => {
    img.addEventListener('load', r); img.addEventListener('error', r); setTimeout(r, 15000); })));
  out.images = [...document.images].filter(i => !(i.naturalWidth > 0))
                                   .map(i => i.getAttribute('src') || i.currentSrc || '(no src)');
  for (const el of document.querySelectorAll('.math')) {
    if (!el.querySelector('mjx-container')) out.unrendered.push(el.textContent.trim().slice(0, 80));
  }
  out.merrors = document.querySelectorAll('mjx-merror').length;
  const skip = new Set(['PRE', 'CODE', 'SCRIPT', 'STYLE', 'TEXTAREA', 'NOSCRIPT', 'MJX-CONTAINER']);
  const top = document.body || document.documentElement;
  const walker = document.createTreeWalker(top, NodeFilter.SHOW_TEXT, {acceptNode(n) {
    for (let e = n.parentElement; e; e = e.parentElement) { if (skip.has(e.tagName)) return NodeFilter.FILTER_REJECT; }
    const p = n.parentElement;
    return p && p.getClientRects().length ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_REJECT; }});
  const rawTex = /\\\(|\\\[|\$\$|\$\\[A-Za-z]|\\begin\{/;
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const m = n.textContent.match(rawTex);
    if (m) {
      const i = m.index;
      out.raw.push(n.textContent.slice(Math.max(0, i - 30), i + 50).replace(/\s+/g, ' '));
    }
  }
  if (checkScroll) {
    document.querySelectorAll('pre').forEach((pre, k) => {
      if (pre.clientWidth > 0 && pre.scrollWidth > pre.clientWidth + 1) {
        const lines = pre.textContent.split('\n');
        const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), '');
        const where = pre.closest('.cell_output') ? 'output'
                    : (pre.closest('.cell_input') ? 'code cell' : 'code block');
        out.scroll.push({index: k, where: where, scrollWidth: pre.scrollWidth, clientWidth: pre.clientWidth,
                         chars: longest.length, line: longest.trim().slice(0, 100)});
      }
    });
    // A display equation wider than the text column: its box scrolls (or is clipped) sideways.
    const texOf = box => {
      try { return MathJax.startup.document.getMathItemsWithin(box)[0].math.trim().slice(0, 70); }
      catch (e) { return ''; }
    };
    document.querySelectorAll('div.math').forEach((box, k) => {
      const eq = box.querySelector('mjx-container');
      if (!eq || box.clientWidth === 0) return;
      // the equation's own box (beside its number) or the whole display may be the one that overflows
      const over = [eq, box].find(e => e.scrollWidth > e.clientWidth + 1);
      if (over) {
        out.wide.push({index: k, scrollWidth: over.scrollWidth, clientWidth: over.clientWidth,
                       tex: texOf(box) || box.id || ''});
      }
    });
  }
  done(out);
})().catch(e => done({fatal: String(e)}));
"""


class _Anchors(html.parser.HTMLParser):
    """Collects every ``id`` and ``<a name>`` of an HTML file: the anchors a link may point to."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value and (key == "id" or (tag == "a" and key == "name")):
                self.ids.add(value)


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(parser.ids)


def _check_links(root: Path, base: str, page: str, hrefs: list[str]) -> list[Problem]:
    """Internal links (same origin) must name an existing file and, with a ``#frag``, an existing anchor."""
    problems, seen = [], set()
    for href in hrefs:
        if not href.startswith(base) or href in seen:
            continue  # external (not fetched: no network) or already checked
        seen.add(href)
        url, frag = urldefrag(href)
        rel = unquote(urlsplit(url).path)[len(urlsplit(base).path):]
        target = root / rel
        if not rel or rel.endswith("/"):
            target = target / "index.html"
        if not target.is_file():
            problems.append(Problem(page, "link", f"{href[len(base) - 1:]} -> no file {rel or 'index.html'}"))
        elif frag and target.suffix == ".html" and unquote(frag) not in _anchors(target.resolve()):
            problems.append(Problem(page, "link", f"{href[len(base) - 1:]} -> no anchor #{frag} in {rel}"))
    return problems


def _screenshot(driver: object, path: Path) -> None:
    """The page from its top, up to MAX_SHOT_HEIGHT pixels, as a PNG."""
    import base64

    height = min(int(driver.execute_script("return document.documentElement.scrollHeight")), MAX_SHOT_HEIGHT)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": WIDTH, "height": max(height, 1), "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


_REFRESH = re.compile(r"""<meta\s+http-equiv=["']refresh["']\s+content=["'][^"']*url=([^"'>]+)["']""", re.IGNORECASE)


def _redirect_target(path: Path) -> str | None:
    """The target of a redirect-only page (``<meta http-equiv="refresh" ... url=...>``), else None."""
    m = _REFRESH.search(path.read_text(encoding="utf-8", errors="replace")[:2000])
    return m.group(1).strip() if m else None


def list_pages(root: Path) -> list[str]:
    """Every HTML page of the site, relative to ``root``, except Sphinx's copied sources and static
    files and redirect-only pages (whose targets :func:`check_site` checks without opening them)."""
    pages = []
    for p in sorted(root.rglob("*.html")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] in ("_static", "_sources", "_images") or _redirect_target(p):
            continue
        pages.append(rel)
    return pages


def _check_redirects(root: Path) -> list[Problem]:
    """Redirect-only pages must point at an existing page."""
    problems = []
    for p in sorted(root.rglob("*.html")):
        target = _redirect_target(p)
        if target and "://" not in target and not (p.parent / urldefrag(target)[0]).is_file():
            problems.append(Problem(p.relative_to(root).as_posix(), "link", f"redirects to a missing {target}"))
    return problems


def check_site(root: str | Path, *, pages: list[str] | None = None, screenshots: str | Path | None = None,
               screenshot_pages: Iterable[str] = SCREENSHOT_PAGES, log: bool = True) -> Report:
    """Open each page of the site in ``root`` (default: all) and collect its problems."""
    root = Path(root).resolve()
    report = Report(pages=pages if pages is not None else list_pages(root))
    if pages is None:
        report.problems += _check_redirects(root)
    shots_dir = Path(screenshots) if screenshots else None
    if shots_dir:
        shutil.rmtree(shots_dir, ignore_errors=True)
        shots_dir.mkdir(parents=True)
    with serve(root) as base, chromium() as driver:
        for page in report.pages:
            t0 = time.monotonic()
            driver.get_log("browser")  # drop what earlier pages left
            driver.get(base + page)
            check_scroll = not page.startswith("_modules/")
            m = driver.execute_async_script(_MEASURE_JS, check_scroll)
            if "fatal" in m:  # once, a page was caught mid-way by the script: load it again
                driver.get(base + page)
                m = driver.execute_async_script(_MEASURE_JS, check_scroll)
            found: list[Problem] = []
            if "fatal" in m:
                found.append(Problem(page, "console", f"the check script failed: {m['fatal']}"))
                m = {}
            if m.get("mathjax") not in (None, "ok"):
                found.append(Problem(page, "math", f"MathJax {m['mathjax']}"))
            if m.get("mathjaxVersion") and not str(m["mathjaxVersion"]).startswith("3."):
                found.append(Problem(page, "math", f"MathJax {m['mathjaxVersion']} is not the vendored MathJax 3"))
            found += [Problem(page, "math", f"unrendered equation: {t!r}") for t in m.get("unrendered", [])]
            found += [Problem(page, "math", f"raw TeX in the text: ...{t}...") for t in m.get("raw", [])]
            if m.get("merrors"):
                found.append(Problem(page, "math", f"{m['merrors']} MathJax error(s) (mjx-merror)"))
            found += [Problem(page, "image", f"image did not load: {src}") for src in m.get("images", [])]
            found += [Problem(page, "scroll", f"{s['where']} #{s['index']} scrolls ({s['scrollWidth']} > "
                                              f"{s['clientWidth']} px; longest line {s['chars']} chars: "
                                              f"{s['line']!r})") for s in m.get("scroll", [])]
            found += [Problem(page, "scroll", f"display equation #{w['index']} {w['tex']!r} is wider than the "
                                              f"column ({w['scrollWidth']} > {w['clientWidth']} px)")
                      for w in m.get("wide", [])]
            hrefs = driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
            if page.startswith("_modules/"):  # viewcode's [docs] links name objects by the module that
                # defines them; the API page documents many under tinyddpm.* instead, so they miss
                hrefs = [h for h in hrefs if "/api.html#" not in h]
            found += _check_links(root, base, page, hrefs)
            found += [Problem(page, "console", e.get("message", str(e))[:300])
                      for e in driver.get_log("browser") if e.get("level") == "SEVERE"
                      and not any(known in e.get("message", "") for known in KNOWN_CONSOLE_ERRORS)]
            if shots_dir and any(Path(page).name.startswith(s) for s in screenshot_pages):
                shot = shots_dir / (page.replace("/", "__").removesuffix(".html") + ".png")
                _screenshot(driver, shot)
                report.screenshots.append(shot)
            report.problems += found
            if log:
                status = "ok" if not found else ", ".join(f"{sum(p.kind == k for p in found)} {k}"
                                                          for k in KINDS if any(p.kind == k for p in found))
                print(f"  {page:60s} {time.monotonic() - t0:5.1f} s  {status}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: check the site, print every problem, exit 1 on a problem of a failing kind."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path, nargs="?", default=Path("book/_build/html"),
                        help="the built site (default: book/_build/html)")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="folder for screenshots of a few chapters (default: <html>/../screenshots)")
    parser.add_argument("--warn", action="append", default=[], choices=KINDS,
                        help="report problems of this kind without failing (repeatable), e.g. --warn scroll")
    parser.add_argument("--page", action="append", default=None, help="check only this page (repeatable)")
    args = parser.parse_args(argv)
    if not (args.html / "index.html").is_file():
        print(f"browser_check: no built site at {args.html} (no index.html)", file=sys.stderr)
        return 2
    missing = browser_available()
    if missing:
        print(f"browser_check: {missing}", file=sys.stderr)
        return 2
    shots = args.screenshots or args.html.parent / "screenshots"
    print(f"browser_check: {args.html} in headless Chromium ({WIDTH}x{HEIGHT}, network off)")
    report = check_site(args.html, pages=args.page, screenshots=shots)
    for kind in KINDS:
        found = report.of_kind(kind)
        if found:
            label = "warning" if kind in args.warn else "FAIL"
            print(f"\n{label}: {len(found)} {kind} problem(s) on {len({p.page for p in found})} page(s):")
            print("\n".join(f"  {p}" for p in found))
    print(f"\nbrowser_check: {len(report.pages)} pages, {len(report.problems)} problem(s); "
          f"screenshots: {', '.join(str(s) for s in report.screenshots) or 'none'}")
    return 1 if report.failed(args.warn) else 0


if __name__ == "__main__":
    sys.exit(main())
