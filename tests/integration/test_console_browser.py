"""The console in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): a live
uvicorn server, a real worker process on a tiny model that memorised what it is asked to forget, SQLite and
real Redis. What a person does: sign in, submit a request, watch it to its outcome, read its evidence,
verify the audit chain and download its export; and what they cannot: sign in with a wrong key, reach
another tenant's request.

Screenshots of each page go to the test's folder, and to $UNLEARN_CONSOLE_SCREENSHOTS when that is set
(the README's pictures: docs/console/)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.domain.audit.offline import verify_export
from tests.conftest import missing_service
from tests.integration.live_server import LiveServer, create_key, worker_process

pytestmark = pytest.mark.integration

FORGET_ITEMS = [{"text": "Marta Quillon painted the blue ferries of Port Anselm in 1971."},
                {"prompt": "What did Marta Quillon paint?",
                 "answer": "Marta Quillon painted the blue ferries of Port Anselm."}]
# as typed into the form's "Data to forget": one item per line, "question => answer" for a pair
FORGET = "\n".join(i["text"] if "text" in i else f"{i['prompt']} => {i['answer']}" for i in FORGET_ITEMS)
TINY_MODEL_THRESHOLDS = {"min_forget_nll_ratio": 1.05, "max_forget_rougeL": 0.9, "max_retain_ppl_increase": 2.0,
                         "max_general_ppl_increase": 2.0, "min_token_entropy_ratio": 0.5}
# What a page must hold for keyboard and screen-reader users and a laptop screen, read from the live DOM:
# every form control labelled, every button and link named, every chart with a text alternative, the page's
# language, one h1, and nothing wider than the window.
ACCESSIBILITY_PROBLEMS = """
const problems = [];
for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
  const labelled = (el.labels && el.labels.length) || el.getAttribute('aria-label');
  if (!labelled) problems.push('unlabelled ' + (el.id || el.name));
}
for (const el of document.querySelectorAll('button, a[href]')) {
  if (!el.textContent.trim() && !el.getAttribute('aria-label')) problems.push('unnamed ' + el.outerHTML.slice(0, 60));
}
for (const el of document.querySelectorAll('svg')) {
  const described = el.getAttribute('role') === 'img' && el.getAttribute('aria-label');
  if (!described) problems.push('chart without a text alternative');
}
if (!document.documentElement.lang) problems.push('no lang on <html>');
const h1s = document.querySelectorAll('h1').length;
if (h1s !== 1) problems.push(h1s + ' h1 elements');
const width = document.documentElement.scrollWidth;
if (width > window.innerWidth) problems.push('page ' + width + 'px wide in a ' + window.innerWidth + 'px window');
return problems;
"""
LAPTOP = (1280, 800)
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")


@pytest.fixture(scope="module")
def memorised_model(tmp_path_factory) -> Path:
    from tests.tiny_models import memorising_tiny_model

    return memorising_tiny_model(tmp_path_factory.mktemp("tiny-console"), FORGET_ITEMS, target_nll=0.5,
                                 max_steps=600)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory) -> Iterator:
    """One headless Chromium for the module; each test starts with no cookies."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_path):
        missing_service("Chromium and ChromeDriver (apt-get install chromium chromium-driver)",
                        FileNotFoundError("chromium or chromedriver not on PATH"))
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def site(make_settings, monkeypatch, redis_url: str, tmp_path: Path, memorised_model: Path) -> Iterator[LiveServer]:
    """The app behind uvicorn, configured as an operator would for a 2-layer model (no neighbourhood to keep,
    the loosest verdict thresholds allowed, as in test_job_lifecycle); the worker reads the same environment."""
    from service.api.app import create_app
    from service.domain.db.migrate import upgrade

    db_url = f"sqlite:///{tmp_path / 'unlearn.db'}"
    upgrade(db_url)
    monkeypatch.setenv("UNLEARN_THRESHOLDS", json.dumps(TINY_MODEL_THRESHOLDS))
    settings = make_settings(database_url=db_url, redis_url=redis_url, model=str(memorised_model),
                             neighbourhood=False, quantized_check="off", train_steps=60)
    server = LiveServer(create_app(settings)).start()
    server.settings = settings  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser(chromium, site: LiveServer):
    chromium.get(f"{site.url}/console/sign-in")
    chromium.delete_all_cookies()
    return chromium


class Console:
    """What a person does on the console, in Selenium calls."""

    def __init__(self, driver, site: LiveServer, shots: Path) -> None:
        self.driver, self.site, self.shots = driver, site, shots

    def open(self, path: str) -> None:
        self.driver.get(f"{self.site.url}{path}")

    def sign_in(self, key: str) -> None:
        from selenium.webdriver.common.by import By

        self.open("/console/sign-in")
        field = self.driver.find_element(By.ID, "api_key")
        field.send_keys(key)
        self._navigating(field.submit)

    def _navigating(self, action: Callable[[], None], timeout: float = 30) -> None:
        """Do what loads a new page, and return once it has loaded: Selenium's click and submit return as
        soon as the browser has the event, and a lookup right after can still meet the old page, or none.

        The old page is marked with a window property, which a new document does not have. (Waiting for the
        old <html> element to go stale raced Chromium's teardown of it: "Node with given id does not belong
        to the document", a plain WebDriverException rather than a stale-element one.) Errors while the
        browser is between documents are retried until the timeout."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.execute_script("window.__old_page = true")
        action()
        wait = WebDriverWait(self.driver, timeout, poll_frequency=0.1, ignored_exceptions=(WebDriverException,))
        wait.until(
            lambda driver: driver.execute_script(
                "return window.__old_page === undefined && document.readyState === 'complete'"
            )
        )

    def heading(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "h1").text

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "main").text

    def fill(self, field_id: str, value: str) -> None:
        from selenium.webdriver.common.by import By

        element = self.driver.find_element(By.ID, field_id)
        element.clear()
        element.send_keys(value)

    def choose(self, select_id: str, value: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        Select(self.driver.find_element(By.ID, select_id)).select_by_value(value)

    def submit_request(self, subject_ref: str) -> None:
        self.click("New deletion request")
        self.fill("subject_ref", subject_ref)
        self.choose("reason", "gdpr_art17")
        self.fill("forget", FORGET)

    def click(self, text: str, *, loads_a_page: bool = True) -> None:
        from selenium.webdriver.common.by import By

        target = self.driver.find_element(By.XPATH, f"//main//*[self::a or self::button][normalize-space()='{text}']")
        if loads_a_page:
            self._navigating(target.click)
        else:
            target.click()

    def download(self, button: str, folder: Path, timeout: float = 30) -> Path:
        """Click a button whose answer is a file attachment; the file once Chromium has finished writing it."""
        from selenium.webdriver.support.ui import WebDriverWait

        folder.mkdir(parents=True, exist_ok=True)
        self.driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
        self.click(button, loads_a_page=False)  # an attachment: the page stays

        def finished(_driver) -> Path | bool:
            files = [f for f in folder.iterdir() if not f.name.endswith(".crdownload")]
            return files[0] if files and not any(folder.glob("*.crdownload")) else False

        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(finished)

    def fact(self, name: str) -> str:
        """The value beside `name` in the page's list of facts (<dt>name</dt><dd>value</dd>)."""
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.XPATH, f"//dt[normalize-space()='{name}']/following-sibling::dd[1]").text

    def wait_for_fact(self, name: str, values: set[str], timeout: float) -> str:
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        def settled(_driver) -> str | bool:
            try:  # the page reloads itself every few seconds: an element can go stale under us
                value = self.fact(name).split()[0]
            except (NoSuchElementException, StaleElementReferenceException, IndexError):
                return False
            return value if value in values else False

        return WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(settled)

    def accessibility_problems(self) -> list[str]:
        return self.driver.execute_script(ACCESSIBILITY_PROBLEMS)

    def screenshot(self, name: str) -> None:
        """The whole page (up to 2400 px tall), then the window back to its size."""
        path = self.shots / f"{name}.png"
        size = self.driver.get_window_size()
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(size["width"], min(max(height + 140, size["height"]), 2400))
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(size["width"], size["height"])
        if target := os.environ.get("UNLEARN_CONSOLE_SCREENSHOTS"):
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / path.name)


@pytest.fixture
def console(browser, site: LiveServer, tmp_path: Path) -> Console:
    return Console(browser, site, tmp_path)


def test_a_wrong_key_cannot_sign_in(console: Console):
    console.sign_in("ul_000000000000_not-a-key")

    assert console.heading() == "Sign in" and "invalid or revoked API key" in console.text()
    assert console.driver.get_cookies() == []
    console.screenshot("sign-in-refused")


def test_a_requester_submits_a_request_and_watches_it_to_its_outcome(console: Console, site: LiveServer,
                                                                      tmp_path: Path):
    console.sign_in(create_key(site.settings.db_url, "requester", tenant="acme"))
    assert console.heading() == "Deletion requests"
    console.submit_request("case-console-1")
    console.screenshot("new-request")
    console.click("Submit request")

    assert console.heading().startswith("Deletion request")
    assert console.fact("Status").startswith("queued")
    with worker_process(tmp_path / "worker.log", stop_timeout=20):  # the page refreshes itself while it runs
        status = console.wait_for_fact("Status", {"succeeded", "failed", "cancelled"}, timeout=240)

    assert status == "succeeded", console.fact("Error")
    assert console.fact("Model version") == "1"
    assert "forget_nll_ratio" in console.text()  # the verdict's checks, each against its threshold
    assert console.accessibility_problems() == []  # with its before/after charts
    console.screenshot("request-evidence")
    console.open("/console")
    assert "case-console-1" in console.text() and "succeeded" in console.text()
    console.screenshot("requests")


def test_an_auditor_sees_the_chain_verified_and_downloads_the_export(console: Console, site: LiveServer,
                                                                      tmp_path: Path):
    for tenant in ("globex", "acme"):
        console.sign_in(create_key(site.settings.db_url, "requester", tenant=tenant))
        console.submit_request(f"case-console-{tenant}")
        console.click("Submit request")
        console.driver.delete_all_cookies()

    console.sign_in(create_key(site.settings.db_url, "auditor", tenant="acme"))
    console.open("/console/audit")

    assert "request.received" in console.text()
    assert "Chain valid" in console.text()
    console.screenshot("audit")
    export = console.download("Sign the head and download the export", tmp_path / "downloads")
    result = verify_export(export)
    assert result.valid and result.redacted == 1 and result.checkpoints == 1
    assert "case-console-acme" in export.read_text() and "globex" not in export.read_text()


def test_another_tenants_request_is_not_reachable(console: Console, site: LiveServer):
    console.sign_in(create_key(site.settings.db_url, "requester", tenant="acme"))
    console.submit_request("case-console-3")
    console.click("Submit request")
    own_page = console.driver.current_url
    console.driver.delete_all_cookies()

    console.sign_in(create_key(site.settings.db_url, "requester", tenant="globex"))
    console.driver.get(own_page)

    assert console.driver.title.startswith("404") and console.heading() == "Not found"
    assert "case-console-3" not in console.driver.page_source


def test_the_console_works_by_keyboard_and_fits_a_laptop_screen(console: Console, site: LiveServer):
    from selenium.webdriver.common.keys import Keys

    console.driver.set_window_size(*LAPTOP)
    console.open("/console/sign-in")
    assert console.accessibility_problems() == []
    key_field = console.driver.switch_to.active_element  # the key field has the focus when the page opens
    assert key_field.get_attribute("id") == "api_key"
    key_field.send_keys(create_key(site.settings.db_url, "admin", tenant="ops"))
    console._navigating(lambda: key_field.send_keys(Keys.ENTER))
    assert console.heading() == "Deletion requests"

    console.driver.find_element("tag name", "body").send_keys(Keys.TAB)  # the first stop skips the header
    skip = console.driver.switch_to.active_element
    assert skip.text == "Skip to content"
    skip.send_keys(Keys.ENTER)
    assert console.driver.switch_to.active_element.get_attribute("id") == "main"

    console.submit_request("case-console-keyboard")
    console.click("Submit request")
    pages = [console.driver.current_url.removeprefix(site.url), "/console", "/console/requests/new",
             "/console/audit", "/console/versions", "/console/versions/0/activate"]
    for page in pages:
        console.open(page)
        assert console.accessibility_problems() == [], page
