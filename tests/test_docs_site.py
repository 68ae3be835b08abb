"""Browser checks of the built documentation site (headless Debian Chromium through selenium).

The site is read from the folder named by MLATLAS_SITE (default: site/ at the repository root,
which `make docs` builds), served by a local HTTP server on a free port, and every page
(every index.html) is loaded once in one headless Chromium. The checks:

1. no console message of level SEVERE on any page (a KaTeX parse error is one: docs/javascripts/
   katex.js reports it with console.error);
2. no broken image: every <img> has loaded with a non-zero natural width;
3. no broken link: every same-site <a href> gets HTTP 200 from the server, and its #fragment is
   an id (or <a name>) in the target page; each distinct target is fetched once;
4. the maths is rendered: every .arithmatex element holds KaTeX output, there is no .katex-error,
   the visible text outside <pre>/<code> holds no raw `$$`, `\\[` or `\\(`, and at least
   MIN_MATH_PAGES pages carry maths;
5. Material's search (header input, index in a web worker) puts the expected page among the first
   SEARCH_TOP results for English and Chinese queries (jieba segments Chinese at build time);
6. screenshots at 1280x900 of the front page, a method page, an API page and a search, as PNG
   files in MLATLAS_SCREENSHOTS (default /tmp/mlatlas-docs-screenshots).

Run (`make docs-check` builds the site and runs this module):

    mkdocs build --strict -d /tmp/site
    MLATLAS_SITE=/tmp/site python -m pytest -q -n 0 -m docs tests/test_docs_site.py

Without chromium, chromedriver, selenium or a built site the tests are skipped, unless
MLATLAS_REQUIRE_BROWSER=1 (as in CI), which turns the skip into a failure.
"""

from __future__ import annotations

import functools
import http.server
import os
import struct
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH, HEIGHT = 1280, 900

# The method pages carry maths; fewer pages with .arithmatex elements means maths went missing.
MIN_MATH_PAGES = 6  # the front page and the five method pages converted so far (issue 25)
# Seconds to wait for KaTeX on a page, and for search results.
MATH_TIMEOUT = 10.0
SEARCH_TIMEOUT = 20.0
# A query passes when its page is among this many first results.
SEARCH_TOP = 3
SEARCHES = [
    ("diffusion", "methods/diffusion/"),
    ("policy gradient", "methods/rl-tabular-policy_gradient/"),
    ("CircularEval", "methods/circular_eval/"),
    ("扩散", "methods/diffusion/"),
    ("策略梯度", "methods/rl-tabular-policy_gradient/"),
]
# Pages to photograph (site path -> file name); the search screenshot is taken in test_search.
SCREENSHOTS = {"": "index.png", "methods/diffusion/": "methods-diffusion.png",
               "api/diffusion/": "api-diffusion.png"}
SEARCH_SCREENSHOT = ("扩散", "search-zh-diffusion.png")
# A 1280x900 PNG of a blank page is a few kB; a page with text and figures is tens of kB.
MIN_SCREENSHOT_BYTES = 10_000


def _unavailable(reason: str):
    """Skip, or fail where the browser check is required (MLATLAS_REQUIRE_BROWSER=1)."""
    if os.environ.get("MLATLAS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MLATLAS_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------
# The site, its server and the browser


@pytest.fixture(scope="module")
def site() -> Path:
    path = Path(os.environ.get("MLATLAS_SITE", ROOT / "site")).resolve()
    for needed in ("index.html", "search/search_index.json"):
        if not (path / needed).is_file():
            _unavailable(f"the built site has no {needed} in {path} (run `make docs`, or set "
                         f"MLATLAS_SITE to a folder built by `mkdocs build`)")
    return path


@pytest.fixture(scope="module")
def pages(site) -> list[str]:
    """The site path of every page ("" for the front page, "methods/diffusion/", ...)."""
    found = sorted(p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    return ["" if p == "." else p + "/" for p in found]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def base_url(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def driver():
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            _unavailable(f"{binary} is missing (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[docs]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver: Selenium Manager would look for one on the network.
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                               options=options)
    # --window-size sizes the window; the viewport (what a screenshot holds) is what counts.
    inner = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    size = browser.get_window_size()
    browser.set_window_size(size["width"] + WIDTH - inner[0], size["height"] + HEIGHT - inner[1])
    browser.set_page_load_timeout(30)
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


def _severe(driver) -> list[str]:
    """The SEVERE console messages since the last call (reading the log empties it)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE"]


def _wait(predicate, timeout: float, interval: float = 0.1):
    """Poll until predicate() is truthy; return its last value (falsy on a timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


_MATH_PENDING = ("return Array.from(document.querySelectorAll('.arithmatex'))"
                 ".filter(e => !e.querySelector('.katex')).length;")


def _load(driver, url: str) -> None:
    """Open url and wait until it is loaded and KaTeX has rendered its maths (or timed out)."""
    driver.get(url)
    _wait(lambda: driver.execute_script("return document.readyState") == "complete", 30)
    _wait(lambda: driver.execute_script(_MATH_PENDING) == 0, MATH_TIMEOUT)


# ---------------------------------------------------------------------------------------------
# One visit of every page, recorded for the checks below


# Every <img> loaded (lazy ones are made eager first); returns the src of the broken ones.
_BROKEN_IMAGES = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
const settle = img => img.complete ? Promise.resolve() : new Promise(resolve => {
  img.addEventListener("load", resolve, {once: true});
  img.addEventListener("error", resolve, {once: true});
});
images.forEach(img => { img.loading = "eager"; });
Promise.race([Promise.all(images.map(settle)), new Promise(r => setTimeout(r, 10000))])
  .then(() => done(images.filter(img => !(img.complete && img.naturalWidth > 0))
                         .map(img => img.getAttribute("src"))));
"""

# The text a reader sees outside code, maths markup for screen readers left out.
_VISIBLE_TEXT = """
const style = document.createElement("style");
style.textContent = "pre, code, .katex-mathml { display: none !important; }";
document.head.appendChild(style);
const text = document.body.innerText;
style.remove();
return text;
"""

_PAGE_FACTS = """
return {
  links: Array.from(document.querySelectorAll("a[href]"), a => a.href),
  math: document.querySelectorAll(".arithmatex").length,
  unrendered: Array.from(document.querySelectorAll(".arithmatex"))
    .filter(e => !e.querySelector(".katex")).map(e => e.textContent.trim().slice(0, 80)),
  katex_errors: Array.from(document.querySelectorAll(".katex-error"),
                           e => e.textContent.trim().slice(0, 80)),
};
"""

RAW_DELIMITERS = ("$$", "\\[", "\\(")


@dataclass
class PageVisit:
    path: str
    severe: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    math: int = 0
    unrendered: list[str] = field(default_factory=list)
    katex_errors: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def visits(driver, base_url, pages) -> dict[str, PageVisit]:
    _severe(driver)  # whatever the browser logged before the first page
    result = {}
    for path in pages:
        _load(driver, base_url + path)
        visit = PageVisit(path, broken_images=driver.execute_async_script(_BROKEN_IMAGES),
                          **driver.execute_script(_PAGE_FACTS))
        text = driver.execute_script(_VISIBLE_TEXT)
        for delimiter in RAW_DELIMITERS:
            at = text.find(delimiter)
            if at >= 0:
                visit.raw.append(f"{delimiter!r} in ...{text[max(0, at - 40):at + 40]!r}...")
        visit.severe = _severe(driver)
        result[path] = visit
    return result


def _report(failures: dict[str, list[str]], what: str) -> str:
    lines = [f"{len(failures)} page(s) with {what}:"]
    for path, items in failures.items():
        lines.append(f"  /{path}")
        lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 1-4: console, images, links, maths


def test_no_console_errors(visits):
    failures = {p: v.severe for p, v in visits.items() if v.severe}
    assert not failures, _report(failures, "SEVERE console messages")


def test_no_broken_images(visits):
    failures = {p: [f"<img src={src!r}> did not load" for src in v.broken_images]
                for p, v in visits.items() if v.broken_images}
    assert not failures, _report(failures, "broken images")


class _Anchors(HTMLParser):
    """The ids (and <a name>s) of an HTML page: the fragments a link may point to."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])


def test_no_broken_links(visits, base_url):
    origin = urlsplit(base_url).netloc
    fetched: dict[str, tuple[str | None, set[str]]] = {}  # url -> (error, ids in it)

    def fetch(url: str) -> tuple[str | None, set[str]]:
        if url not in fetched:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    body = response.read()
                    if response.status != 200:
                        fetched[url] = (f"HTTP {response.status}", set())
                    elif "html" in response.headers.get("Content-Type", ""):
                        parser = _Anchors()
                        parser.feed(body.decode("utf-8", errors="replace"))
                        fetched[url] = (None, parser.ids)
                    else:
                        fetched[url] = (None, set())
            except urllib.error.HTTPError as error:
                fetched[url] = (f"HTTP {error.code}", set())
            except OSError as error:
                fetched[url] = (f"{type(error).__name__}: {error}", set())
        return fetched[url]

    failures: dict[str, list[str]] = {}
    for path, visit in visits.items():
        page_url = base_url + path
        for href in dict.fromkeys(visit.links):  # in order, once each
            parts = urlsplit(href)
            if parts.scheme not in ("http", "https") or parts.netloc != origin:
                continue  # another site, mailto:, javascript:
            target, fragment = urldefrag(urljoin(page_url, href))
            error, ids = fetch(target)
            if error:
                failures.setdefault(path, []).append(f"{href}: {error}")
            elif fragment and unquote(fragment) not in ids:
                failures.setdefault(path, []).append(
                    f"{href}: no id {unquote(fragment)!r} in {target}")
    assert not failures, _report(failures, "broken links")


def test_maths_rendered(visits):
    math_pages = [p for p, v in visits.items() if v.math]
    failures = {}
    for path, visit in visits.items():
        problems = [f"not rendered by KaTeX: {tex!r}" for tex in visit.unrendered]
        problems += [f".katex-error: {text!r}" for text in visit.katex_errors]
        problems += [f"raw delimiter {raw}" for raw in visit.raw]
        if problems:
            failures[path] = problems
    assert not failures, _report(failures, "maths not rendered")
    assert len(math_pages) >= MIN_MATH_PAGES, (
        f"only {len(math_pages)} page(s) carry maths (.arithmatex), expected at least "
        f"{MIN_MATH_PAGES}: {math_pages}")


# ---------------------------------------------------------------------------------------------
# 5: search


_SEARCH_STATE = """
return {
  meta: (document.querySelector(".md-search-result__meta") || {}).textContent || "",
  hrefs: Array.from(document.querySelectorAll(".md-search-result__list > li"),
                    li => (li.querySelector("a") || {}).href || ""),
};
"""


def _search(driver, base_url: str, query: str) -> list[str]:
    """Type query into the header search and return the site paths of the results, in order,
    once the worker has answered and the list has stopped changing."""
    from selenium.webdriver.common.by import By

    _load(driver, base_url)
    box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    ready = _wait(lambda: "Initializing" not in driver.execute_script(_SEARCH_STATE)["meta"],
                  SEARCH_TIMEOUT)
    assert ready, f"search for {query!r}: the search index did not load in {SEARCH_TIMEOUT} s"
    box.send_keys(query)
    assert box.get_attribute("value") == query, f"search for {query!r}: typed text got lost"

    seen = []

    def settled():
        seen.append(driver.execute_script(_SEARCH_STATE)["hrefs"])
        return len(seen) >= 4 and seen[-1] and all(s == seen[-1] for s in seen[-4:])

    _wait(settled, SEARCH_TIMEOUT, interval=0.25)
    # A result links to page/?h=terms#section (search.highlight): the page is the path.
    return [urlsplit(href).path.removeprefix("/") for href in seen[-1]]


@pytest.mark.parametrize("query, expected", SEARCHES, ids=[q for q, _ in SEARCHES])
def test_search(driver, base_url, query, expected):
    _severe(driver)
    results = _search(driver, base_url, query)
    assert expected in results[:SEARCH_TOP], (
        f"search for {query!r} on /: /{expected} is not among the first {SEARCH_TOP} results; "
        f"got {['/' + r for r in results[:10]]}")
    assert not (severe := _severe(driver)), f"search for {query!r}: SEVERE console: {severe}"


# ---------------------------------------------------------------------------------------------
# 6: screenshots


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("MLATLAS_SCREENSHOTS", "/tmp/mlatlas-docs-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_png(path: Path, what: str) -> None:
    assert path.is_file(), f"{what}: no screenshot written to {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{what}: {path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (WIDTH, HEIGHT), f"{what}: {path} is {width}x{height}"
    assert len(data) >= MIN_SCREENSHOT_BYTES, (
        f"{what}: {path} has {len(data)} bytes, a blank page? (expected >= "
        f"{MIN_SCREENSHOT_BYTES})")


def test_screenshots(driver, base_url, screenshots):
    for path, name in SCREENSHOTS.items():
        _load(driver, base_url + path)
        driver.save_screenshot(str(screenshots / name))
        _check_png(screenshots / name, f"screenshot of /{path}")
    query, name = SEARCH_SCREENSHOT
    _search(driver, base_url, query)
    driver.save_screenshot(str(screenshots / name))
    _check_png(screenshots / name, f"screenshot of the search for {query!r}")
