"""Every page of the built site in a real browser (headless Chromium driven by Playwright).

Per page: no JavaScript errors, no request leaves the machine, every image loads,
math is typeset (MathJax from the site itself), solutions stay collapsed until
clicked, code blocks have copy buttons. A screenshot of each page is saved to
``artifacts/screenshots/`` for a person to look at.

Needs Debian's ``chromium`` package (``apt-get install chromium``; CI installs it).
"""

import functools
import http.server
import re
import shutil
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def site_pages() -> list[Path]:
    skip = {"genindex.html", "search.html", "py-modindex.html"}
    return sorted(p for p in HTML.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts and p.name not in skip)


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.fail("The site is not built: run `make html` (or `make test`, which builds it first).")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): browser checks skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.mark.parametrize("page_path", site_pages() or [HTML / "index.html"], ids=lambda p: str(p.relative_to(HTML)))
def test_page_in_a_browser(server, browser, page_path):
    relative = page_path.relative_to(HTML).as_posix()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, outside = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))

    def only_local(route):
        if route.request.url.startswith(server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(f"{server}/{relative}", wait_until="load")
    html = page.content()

    broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    assert broken == [], f"broken images: {broken}"
    missing_alt = page.evaluate("Array.from(document.querySelectorAll('img')).filter(i => !i.alt).map(i => i.src)")
    assert missing_alt == [], f"images without alt text: {missing_alt}"

    if page.locator("div.math, span.math").count():
        # Typeset by the bundled MathJax. Math inside a collapsed solution is typeset but hidden,
        # so wait for the containers to exist, then check that every formula was typeset.
        page.wait_for_selector("mjx-container", state="attached", timeout=15_000)
        page.wait_for_function(
            "document.querySelectorAll('div.math, span.math').length"
            " <= document.querySelectorAll('mjx-container').length",
            timeout=15_000,
        )

    if page.locator("div.highlight pre").count():
        assert page.locator("button.copybtn").count() > 0, "code blocks without copy buttons"

    solutions = page.locator("div.solution.dropdown")
    if solutions.count():
        first = solutions.first
        body = first.locator("> :not(.admonition-title)").first
        assert not body.is_visible(), "a solution is open before it is clicked"
        first.locator(".admonition-title").click()
        body.wait_for(state="visible", timeout=5_000)

    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / (re.sub(r"[^A-Za-z0-9_.-]", "_", relative) + ".png")))
    page.close()
    assert errors == [], f"JavaScript errors: {errors}"
    assert outside == [], f"requests that leave the site (the page must work offline): {outside}"
    assert "Traceback (most recent call last)" not in html
