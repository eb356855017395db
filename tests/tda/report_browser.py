"""Open a report page in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium)
and check what a reader sees: no console errors, nothing fetched from anywhere, a row per method,
every figure drawn at a nonzero size, and the explorer showing a target's top examples after a click.

    python -m tests.tda.report_browser PAGE.html [--screenshots DIR]   (checks a page; shots for docs/)
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def chromium_missing() -> str | None:
    """Why the browser checks cannot run here, or None when they can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} missing: apt-get install chromium chromium-driver (make test does, as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[dev]')"
    return None


def open_browser(width: int = 1400, height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(  # offline: a page that needed the network would show it
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    return driver


def check_page(path: Path, methods: set[str], screenshots: Path | None = None) -> dict[str, Any]:
    """Every check on the page at `path` (AssertionError naming the first that fails); returns what
    was seen: figure sizes, the rows of the methods table and the first proponent's text."""
    text = path.read_text(encoding="utf-8")
    assert not EXTERNAL.findall(text), f"external src/href in the page: {EXTERNAL.findall(text)[:3]}"
    driver = open_browser()
    try:
        driver.get(path.resolve().as_uri())
        seen = _check_static(driver, methods)
        if screenshots is not None:
            driver.save_screenshot(str(screenshots / "report.png"))
        seen["proponent"] = _check_explorer(driver)
        if screenshots is not None:
            driver.save_screenshot(str(screenshots / "report-explorer.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, f"console errors: {errors}"
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert not fetched, f"the page fetched {fetched}"
        return seen
    finally:
        driver.quit()


def _check_static(driver: Any, methods: set[str]) -> dict[str, Any]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#methods-table tbody tr[data-method]")
    shown = [r.get_attribute("data-method") for r in rows]
    assert sorted(shown) == sorted(methods), f"methods table rows {shown}, expected {sorted(methods)}"
    sizes = driver.execute_script(
        "return [...document.querySelectorAll('figure.fig')].map(f => {"
        " const g = f.querySelector('svg, img, canvas'); const r = g ? g.getBoundingClientRect() : null;"
        " return [f.dataset.figure, r ? r.width : 0, r ? r.height : 0]; })"
    )
    assert sizes, "no figures on the page"
    flat = [s for s in sizes if s[1] <= 0 or s[2] <= 0]
    assert not flat, f"figures drawn without a size: {flat}"
    return {"methods": shown, "figures": sizes}


def _check_explorer(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    assert not driver.find_elements(By.CSS_SELECTOR, "#detail table.proponents"), "examples before a click"
    target = driver.find_element(By.CSS_SELECTOR, "#targets tbody tr[data-target]")
    driver.execute_script(
        "arguments[0].scrollIntoView({block: 'center'})", driver.find_element(By.ID, "explorer")
    )
    target.click()
    deadline = time.monotonic() + 5
    while not (cells := driver.find_elements(By.CSS_SELECTOR, "#detail table.proponents tbody tr td.text")):
        assert time.monotonic() < deadline, "the explorer showed no proponents after a click"
        time.sleep(0.05)
    driver.execute_script("document.getElementById('explorer').scrollIntoView()")
    opponents = driver.find_elements(By.CSS_SELECTOR, "#detail table.opponents tbody tr")
    assert opponents, "the explorer showed no opponents"
    assert cells[0].text.strip(), "the first proponent has no text"
    return cells[0].text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("--methods", help="comma-separated methods expected in the table (default: the page's)")
    ap.add_argument("--screenshots", type=Path, help="write report.png and report-explorer.png here")
    args = ap.parse_args()
    methods = set(args.methods.split(",")) if args.methods else _methods_in(args.page)
    seen = check_page(args.page, methods, args.screenshots)
    print(f"ok: {len(seen['methods'])} methods, {len(seen['figures'])} figures {seen['figures']}")
    print(f"first proponent: {seen['proponent'][:80]!r}")


def _methods_in(page: Path) -> set[str]:
    import html

    return {html.unescape(m) for m in re.findall(r'<tr data-method="([^"]*)"', page.read_text("utf-8"))}


if __name__ == "__main__":
    main()
