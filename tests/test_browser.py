"""What a new user sees after the nightly run, in a real browser: Debian's Chromium driven by
Selenium through Debian's chromedriver (scripts/setup.sh installs both; Selenium's driver
manager is kept offline and never downloads a browser). Reuses the session's one real
scheduler run (``airflow_pipeline`` in conftest.py). Never skipped: a missing browser fails."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import clean_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# As root in a container, without a display, on a machine that reaches no public host: no
# sandbox, no GPU, and none of Chromium's own background connections.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1500,1000",
)


@pytest.fixture(scope="module")
def browser(monkeypatch_module):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{missing} not installed: run scripts/setup.sh (Debian's chromium)"
    monkeypatch_module.setenv("SE_OFFLINE", "true")  # Selenium Manager never goes online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _wait(driver, condition, timeout: float = 60):
    """Until ``condition`` holds; React and bootstrap-table re-render while a page settles, so
    an element that went stale between finding and reading it means: look again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.5,
                         ignored_exceptions=(StaleElementReferenceException,))  # fmt: skip
    return wait.until(condition)


@pytest.fixture(scope="module")
def mlflow_ui(airflow_pipeline):
    """``mlflow server`` over the pipeline's tracking database, as `make mlflow-ui` starts it."""
    home = airflow_pipeline[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=clean_env({"MLFLOW_DISABLE_TELEMETRY": "true"}),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_mlflow_run_page_shows_the_model_comparison_plot(browser, mlflow_ui, airflow_pipeline):
    import mlflow
    from selenium.webdriver.common.by import By

    client = mlflow.MlflowClient(tracking_uri=mlflow_ui)
    experiment = client.get_experiment_by_name("shopml-nightly")
    (run,) = client.search_runs(
        [experiment.experiment_id], "tags.mlflow.runName = 'nightly-2025-12-31'"
    )
    base = f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    browser.get(f"{base}/artifacts/plots/ndcg_by_model.png")

    def plot_loaded(driver):
        images = driver.find_elements(By.CSS_SELECTOR, "img[src^='blob:']")
        widths = [driver.execute_script("return arguments[0].naturalWidth", i) for i in images]
        return any(w > 400 for w in widths)  # the 8-inch-wide figure, decoded by the browser

    _wait(browser, plot_loaded)
    # the run page: every evaluated model is a child run; the gate's decision is its description
    browser.get(base)
    _wait(browser, lambda d: "Child runs" in d.find_element(By.TAG_NAME, "body").text)
    body = browser.find_element(By.TAG_NAME, "body").text
    for child in ("two_stage", "popularity", "personal_top_frequency", "user_knn"):
        assert child in body
    assert "Promoted to champion" in body and "2025-12-31" in body


def test_data_docs_index_lists_the_validations_offline(browser, airflow_pipeline):
    from selenium.webdriver.common.by import By

    index = airflow_pipeline[0] / "gx" / "gx" / "uncommitted" / "data_docs" / "local_site"
    browser.get((index / "index.html").as_uri())
    text = _wait(browser, lambda d: "\n".join(
        r.text for r in d.find_elements(By.CSS_SELECTOR, "table tbody tr")))  # fmt: skip
    for suite in ("raw_events", "raw_event_partitions", "raw_items", "user_features",
                  "item_features"):  # fmt: skip
        assert suite in text
    assert "nightly-2025-12-31" in text and "lake/raw/events/ds=2025-12-31" in text
    # the pass/fail icons are Font Awesome glyphs: the site's own copy of the webfont loaded
    font_loaded = (
        "return Array.from(document.fonts).some("
        "f => f.family.includes('Font Awesome') && f.status === 'loaded')"
    )
    _wait(browser, lambda d: d.execute_script(font_loaded))


def test_airflow_dag_page_shows_the_last_runs_true_duration(browser, airflow_pipeline):
    from selenium.webdriver.common.by import By

    airflow = airflow_pipeline[1]
    browser.get(f"{airflow.url}/dags/nightly_retrain/runs")

    def durations(driver):
        headers = [h.text.strip() for h in driver.find_elements(By.CSS_SELECTOR, "thead th")]
        if "Duration" not in headers:
            return None
        col = headers.index("Duration")
        cells = [r.find_elements(By.TAG_NAME, "td") for r in
                 driver.find_elements(By.CSS_SELECTOR, "tbody tr")]  # fmt: skip
        found = [
            c[col].text for c in cells if len(c) > col and re.search(r"\d\d:\d\d", c[col].text)
        ]
        return found or None

    last = _wait(browser, durations)[0].strip()  # newest run first
    # HH:MM:SS; a run recorded from its logical date would show days in front ("335d ...")
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d)(\.\d+)?", last)
    assert match, f"not a duration under a day: {last!r}"
    hours, minutes, seconds = (int(x) for x in match.groups()[:3])
    assert 0 < hours * 3600 + minutes * 60 + seconds < 3600, last
