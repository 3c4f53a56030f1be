"""The dashboard in a real headless browser: Debian's `chromium` driven through its
`chromium-driver` by selenium (nothing is downloaded at test time), against real queen, hive
and echo worker processes. The page lists the workers, its counts and chart move with
requests, a SIGKILLed worker shows FAILED within seconds, a worker drained from the page gets
no more requests, a refused action shows the hive's words, it fits a phone's width, and with
tokens on it asks for the admin token. It saves a screenshot of the loaded page (set
APIARY_UPDATE_SCREENSHOT=1 to write the README's docs/dashboard.png too).

Only a machine without chromium, chromedriver or selenium skips these tests, saying which.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from harness import ROOT, Cluster, Proc, wait_until
from harness.ports import free_port

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

# Debian's packages put them here; PATH is looked at first.
CHROMIUM = ("chromium", "chromium-browser", "/usr/lib/chromium/chromium")
CHROMEDRIVER = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
SCREENSHOT = ROOT / "docs" / "dashboard.png"
# The two demo workers `apiary up` starts; `restart=never` keeps a killed one FAILED (under
# the hive's default policy it is FAILED only for its restart backoff, about a second).
DEMO = "model=demo,count=2,token_delay=0,restart=never"


def find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_parts() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip saying what is missing."""
    try:
        import selenium  # noqa: F401  (only whether it is installed)
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    chromium, driver = find(CHROMIUM), find(CHROMEDRIVER)
    if chromium is None:
        pytest.skip("no chromium browser found (apt-get install chromium)")
    if driver is None:
        pytest.skip("no chromedriver found (apt-get install chromium-driver)")
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium at 1280x800; quit (browser and driver processes) at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_parts()
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,800", "--lang=en-US"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        viewport(driver, 1280, 800)
        yield driver
    finally:
        driver.quit()


def viewport(driver: WebDriver, width: int, height: int, mobile: bool = False) -> None:
    """The page's viewport exactly `width` x `height` CSS pixels (a phone's when `mobile`)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def start(cluster: Cluster, *queen_args: str) -> tuple[Proc, str]:
    """A queen with its HTTP front and one hive of the two demo workers; (queen, base URL)."""
    port = free_port()
    queen = cluster.start_queen(0, "--http-listen", f"127.0.0.1:{port}", *queen_args)
    cluster.start_hive(queen, "dash-h1", DEMO)
    return queen, f"http://127.0.0.1:{port}"


def shown_workers(driver: WebDriver) -> dict[str, dict[str, str]]:
    """The workers table as the page shows it: id -> its state, drained flag and text."""
    rows: dict[str, dict[str, str]] = driver.execute_script("""
        const out = {};
        for (const row of document.querySelectorAll('#workers tbody tr[data-worker]')) {
          out[row.dataset.worker] = {state: row.dataset.state, drained: row.dataset.drained,
                                     text: row.innerText};
        }
        return out;""")
    return rows


def text_of(driver: WebDriver, selector: str) -> str:
    return str(driver.execute_script(
        "const n = document.querySelector(arguments[0]); return n ? n.innerText : '';", selector
    ))  # fmt: skip


def latest_rate(driver: WebDriver) -> float:
    """The requests/s of the chart's newest point, 0 without one."""
    latest = driver.execute_script(
        "const k = document.querySelector('#chart-rate .key.rate');"
        "return k ? k.dataset.latest : '';"
    )
    return float(latest or 0)


def click_and_confirm(driver: WebDriver, label: str) -> str:
    """Click the button labelled `label`, then Confirm in the dialog; the dialog's text."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"button[aria-label={json.dumps(label)}]").click()
    dialog = driver.find_element(By.ID, "confirm")
    assert dialog.get_attribute("open") is not None, "no confirmation was asked"
    asked = dialog.text
    driver.find_element(By.ID, "confirm-ok").click()
    return asked


async def complete(http: httpx.AsyncClient, count: int) -> None:
    for _ in range(count):
        done = await http.post("/v1/completions", json={"model": "demo", "prompt": "a b",
                                                        "max_tokens": 2})  # fmt: skip
        assert done.status_code == 200, done.text


async def test_the_dashboard_shows_the_cluster_live_and_acts_on_it(
    cluster: Cluster, browser: WebDriver, tmp_path: Path
) -> None:
    queen, base = start(cluster)
    await cluster.wait_workers(queen, "demo", 2)
    browser.get(base + "/")
    await wait_until(lambda: len(shown_workers(browser)) == 2, 15)
    workers = shown_workers(browser)
    assert all(w["state"] == "IDLE" and "IDLE" in w["text"] for w in workers.values()), workers
    assert "connecting" not in text_of(browser, "#connection")

    # Requests move the counts and, at the next 5-second point, the chart (fed by the stream).
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        await complete(http, 12)
        await wait_until(lambda: "12 completed" in text_of(browser, "#summary"), 10)
        await wait_until(lambda: latest_rate(browser) > 0, 15)
        assert "Requests/s" in text_of(browser, "#chart-rate")
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        if os.environ.get("APIARY_UPDATE_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(exist_ok=True)
            browser.save_screenshot(str(SCREENSHOT))

        # Drained from the page: the queen routes every request to the other worker.
        drained, other = sorted(workers)
        asked = click_and_confirm(browser, f"Drain worker {drained}")
        assert drained in asked and "Stop routing" in asked
        await wait_until(lambda: shown_workers(browser)[drained]["drained"] == "true", 10)
        assert "DRAINED" in shown_workers(browser)[drained]["text"]
        assert "drained" in text_of(browser, "#notice")
        before = {r["id"] for r in await history(http)}
        await complete(http, 8)
        recent = [r for r in await history(http) if r["id"] not in before]
        assert len(recent) == 8 and {r["worker_id"] for r in recent} == {other}, recent

        # SIGKILL: the row says FAILED within seconds, and the event stream says so too.
        pid = next(w["pid"] for w in (await http.get("/api/cluster")).json()["workers"]
                   if w["id"] == other)  # fmt: skip
        killed = time.monotonic()
        os.kill(int(pid), signal.SIGKILL)
    await wait_until(lambda: shown_workers(browser)[other]["state"] == "FAILED", 10)
    assert time.monotonic() - killed < 10
    assert "FAILED" in shown_workers(browser)[other]["text"]
    await wait_until(lambda: other in text_of(browser, "#events"), 10)
    assert "FAILED" in text_of(browser, "#events")

    # A refused action shows the hive's own words.
    spawn_refused_by_the_hive(browser)
    await wait_until(lambda: "refused" in text_of(browser, "#notice"), 15)
    notice = text_of(browser, "#notice")
    assert "Spawn worker refused" in notice and "has no option 'colour'" in notice, notice

    # A phone's width: one card per row, nothing wider than the screen, states still in words.
    viewport(browser, 390, 844, mobile=True)
    wide = browser.execute_script("return document.documentElement.scrollWidth - innerWidth")
    assert wide <= 1, f"the page is {wide}px wider than a phone's screen"
    browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))
    assert "FAILED" in shown_workers(browser)[other]["text"]


async def history(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    """The queen's request history, as the page reads it."""
    answer = await http.get("/api/requests?limit=100")
    assert answer.status_code == 200, answer.text
    return list(answer.json()["requests"])


def spawn_refused_by_the_hive(driver: WebDriver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    driver.find_element(By.ID, "spawn-model").send_keys("demo")
    Select(driver.find_element(By.ID, "spawn-backend")).select_by_value("echo")
    driver.find_element(By.ID, "spawn-options").send_keys("colour=red")
    driver.find_element(By.ID, "spawn-submit").click()
    asked = driver.find_element(By.ID, "confirm").text
    assert "model demo on hive dash-h1 (backend echo" in asked
    driver.find_element(By.ID, "confirm-ok").click()


async def test_with_tokens_the_page_asks_for_the_admin_token(
    cluster: Cluster, browser: WebDriver, tmp_path: Path
) -> None:
    tokens = {"admin": "dash-admin", "client": "dash-client", "hive": "dash-hive"}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    cluster.server_args = ["--tokens-file", str(tmp_path / "tokens.json")]
    cluster.token = tokens["admin"]
    queen, base = start(cluster)
    await cluster.wait_workers(queen, "demo", 2)
    browser.get(base + "/")
    await wait_until(lambda: "admin token" in text_of(browser, "#token-panel"), 10)
    assert shown_workers(browser) == {}
    enter_token(browser, tokens["client"])
    await wait_until(lambda: "refused this token" in text_of(browser, "#token-panel"), 10)
    assert "admin token needed" in text_of(browser, "#connection")
    enter_token(browser, tokens["admin"])
    await wait_until(lambda: len(shown_workers(browser)) == 2, 10)
    assert browser.find_element("id", "token-panel").is_displayed() is False


def enter_token(driver: WebDriver, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token-input")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()


def test_a_missing_browser_is_a_skip_saying_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match=r"chromium|selenium"):
        browser_parts()
