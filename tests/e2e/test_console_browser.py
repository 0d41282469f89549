"""The operator console in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium against the running stack. Screenshots of each
page go to ``.local/test/artifacts/``.

Selenium is given the driver and the browser explicitly and runs offline, so Selenium
Manager never downloads anything; without them the tests are skipped, saying so."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services import devstack
from services.devclient import read_all, wait_for
from services.runtime.signature import sign
from tests.e2e.conftest import CONSOLE_SECRET, Stack
from tests.e2e.test_confirmations import _signed, stocked_order, wait_audit
from tests.support.harness import REPO

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / ".local" / "test" / "artifacts"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _until(driver: Any, check: Any, what: str) -> Any:
    """Poll the page (a click navigates asynchronously) until ``check`` holds."""
    return WebDriverWait(driver, 30, poll_frequency=0.2).until(check, message=what)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMEDRIVER.exists() and CHROMIUM.exists()):
        pytest.skip(
            "no headless browser: install Debian's chromium and chromium-driver"
            " (.ci/run does where it may install packages)"
        )
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver
    profile = tempfile.mkdtemp(prefix="paysaga-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1500,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options
    )
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _shot(driver: Any, name: str) -> None:
    """A full-page screenshot (the window grown to the page's height)."""
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"
    )
    driver.set_window_size(1500, max(800, min(int(height) + 160, 6000)))
    driver.save_screenshot(str(ARTIFACTS / f"console-{name}.png"))
    driver.set_window_size(1500, 1000)


def test_find_an_order_and_see_each_step_of_its_saga(stack: Stack, browser: Any) -> None:
    order_id, intent, total = stocked_order(stack, prefix="ord_browse")
    txn = stack.pay(order_id, intent, total, "authorize")["transaction_id"]
    stack.wait_status(order_id, "PAID_CONFIRMED")

    browser.get(f"{stack.url('orders')}/console/orders")
    assert browser.title.startswith("Orders")
    browser.find_element(By.ID, "q").send_keys(order_id)
    browser.find_element(By.ID, "search").click()
    _until(browser, lambda d: f"q={order_id}" in d.current_url, "the search's result page")
    links = browser.find_elements(By.CSS_SELECTOR, "a.order-link")
    assert [a.text for a in links] == [order_id]
    _shot(browser, "orders")
    links[0].click()

    _until(browser, lambda d: order_id in d.find_element(By.TAG_NAME, "h1").text, "its page")
    steps = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li.step")]
    assert [s.split()[-1] for s in steps] == [
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert txn in browser.find_element(By.ID, "confirmations").text
    assert f"sku-{order_id}" in browser.find_element(By.ID, "reservations").text
    assert f"capture:{txn}" in browser.find_element(By.ID, "intents").text
    assert txn in browser.find_element(By.ID, "ledger").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#ledger tr.differs")
    _shot(browser, "order")


@pytest.mark.chaos
def test_replay_a_dead_letter_from_the_console(stack: Stack, browser: Any) -> None:
    """As tests/e2e/test_confirmations.py's replay test: a genuine confirmation is
    dead-lettered while payments' database is down; the operator replays it from the
    console and the order moves on to PAID_CONFIRMED."""
    profile = devstack.PROFILES["test"]
    if stack.database_url.rstrip("/") != profile.database_url:
        pytest.skip("stops the local test PostgreSQL; this run uses another server")
    order_id, intent, total = stocked_order(stack, prefix="ord_dlqui")

    def dead_letter() -> Any:
        recs = asyncio.run(read_all(stack.bootstrap, "paysaga.payments.dlq"))
        return next((r for r in recs if r.key == order_id.encode()), None)

    body, _ = _signed(stack, order_id, intent, total)
    assert stack.post_webhook(body, sign("whsec_next", int(time.time()), body)).status_code == 202
    wait_audit(stack, order_id, ("confirmation", "rejected", "signature_invalid"))
    devstack.pg_down(profile)
    try:
        stack.pay(order_id, intent, total, "authorize")
        dead = wait_for(dead_letter, timeout=180, what="the confirmation dead-lettered")
    finally:
        devstack.pg_up(profile)
    stack.wait_status(order_id, "NEEDS_RECONCILIATION", timeout=120)
    ref = f"{dead.topic}:{dead.partition}:{dead.offset}"

    # listed on both with its reason (stalled once past the monitor's 1 s deadline)
    for page in ("reconciliation", "stalled"):

        def listed(d: Any, page: str = page) -> str | None:
            d.get(f"{stack.url('orders')}/console/{page}")
            text = str(d.find_element(By.ID, page).text)
            return text if order_id in text else None

        assert "record_dead_lettered" in _until(browser, listed, f"the order on /{page}")
    _shot(browser, "stalled")

    browser.get(f"{stack.url('orders')}/console/dead-letters")
    letter = browser.find_element(By.ID, f"dl-{ref}")
    letter.find_element(By.CSS_SELECTOR, "summary code").click()  # open the <details>
    assert order_id in letter.text
    _shot(browser, "dead-letters")
    letter.find_element(By.LINK_TEXT, "replay…").click()
    _until(browser, lambda d: d.title.startswith("Replay"), "the confirmation page")
    assert f"paysaga dlq replay {ref}" in browser.page_source
    browser.find_element(By.NAME, "operator_token").send_keys(CONSOLE_SECRET)
    _shot(browser, "replay-confirm")
    browser.find_element(By.ID, "confirm").click()
    message = _until(browser, lambda d: d.find_elements(By.ID, "message"), "the outcome")
    assert message[0].text == "replay: 1 dead letter(s)"

    stack.wait_status(order_id, "PAID_CONFIRMED")
    browser.get(f"{stack.url('orders')}/console/orders/{order_id}")
    steps = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li.step")]
    assert [s.split()[-1] for s in steps][-1] == "PAID_CONFIRMED"
    audit = browser.find_element(By.ID, "audit").text
    assert "dead_letter_replay" in audit
    assert "operator=e2e-operator" in audit
