"""Review in the MLflow UI, in a real browser: a real `mlflow server` on loopback, a small guarded
pipeline logging to it over HTTP, and headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) opening the run: the guard metrics, the verdict tag and the report artifact must be visible;
in the experiment's runs table, the training data as dataset inputs (name and digest) and a numeric
outcome column (guard/updates) that sorts the runs.
Screenshots go to test-output/browser/ (or $TRAIT_GUARD_TEST_OUTPUT/browser/)."""

import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest
from mlflow_server import MlflowServer

from trait_guard.config import GenerateJobConfig, TrainJobConfig, validate_config
from trait_guard.generation import generate_local
from trait_guard.tracking import DATASET_DIGEST_CHARS, MlflowTracker
from trait_guard.train import run_training

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OUTPUT = Path(os.environ.get("TRAIT_GUARD_TEST_OUTPUT", Path(__file__).resolve().parents[1] / "test-output"))


def _browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = "Debian's chromium and chromium-driver are needed: apt-get install chromium chromium-driver"
        if os.environ.get("TRAIT_GUARD_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # no sandbox as root; no background networking: this machine's network is closed
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1500,1700", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # an explicit driver path: Selenium Manager would try to download one
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _wait_for_text(driver, texts, timeout=60.0):
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"not visible after {timeout} s: {missing}\n--- page text ---\n{body[:3000]}")


def _wait_until(condition, what, timeout=60.0):
    """Poll ``condition()`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - the page is still rendering (stale or missing elements)
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not seen after {timeout} s: {what}")


def _table_order(driver, names):
    """The run names of the runs table, top to bottom (its rows are positioned, not in DOM order), among
    ``names``; empty until every one of them is rendered."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, ".ag-pinned-left-cols-container [role=row]")
    rows = sorted(rows, key=lambda row: int(row.get_attribute("row-index")))
    order = [name for row in rows for name in names if name in row.text.split("\n")]
    return order if sorted(order) == sorted(names) else []


def _column_header(driver, title):
    from selenium.webdriver.common.by import By

    return next((h for h in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]") if h.text == title), None)


def _click_column_header(driver, title):
    """Click the header of column ``title``, again if the table re-rendered between finding and
    clicking it (ag-grid replaces header elements as runs load: a stale element)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def click():
        try:
            _column_header(driver, title).click()
            return True
        except StaleElementReferenceException:
            return False

    _wait_until(click, f"a clickable {title} column header")


def _column_values(driver, title):
    """The numbers in the runs table's column ``title``, top to bottom."""
    from selenium.webdriver.common.by import By

    column = _column_header(driver, title).get_attribute("col-id")
    cells = [c for c in driver.find_elements(By.CSS_SELECTOR, "[role=gridcell]") if c.get_attribute("col-id") == column]
    row = "./ancestor::*[@role='row']"
    cells.sort(key=lambda c: int(c.find_element(By.XPATH, row).get_attribute("row-index")))
    return [float(c.text) for c in cells]


def _screenshot(driver, tmp_path, name):
    path = tmp_path / name
    driver.save_screenshot(str(path))
    OUTPUT.joinpath("browser").mkdir(parents=True, exist_ok=True)
    shutil.copy(path, OUTPUT / "browser" / name)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_guarded_run_is_reviewable_in_the_mlflow_ui(tiny_llama_dir, tmp_path):
    model = str(tiny_llama_dir)
    with MlflowServer(tmp_path / "server") as server:
        # a small guarded pipeline: teacher data (owl + control) -> guarded training, logging over HTTP
        data = generate_local(validate_config({
            "output_dir": str(tmp_path / "data"),
            "teachers": [{"id": "owl", "model": model, "trait": "animal:owl", "install": "system_prompt"},
                         {"id": "control", "model": model}],
            "generation": {"n_prompts": 32, "chunk_size": 16, "max_new_tokens": 8, "top_k_logprobs": 4}},
            GenerateJobConfig), progress=False)
        paths = {t.teacher_id: t.path for t in data.teachers}
        summary = run_training(validate_config({
            "output_dir": str(tmp_path / "train"), "data": {"train": paths["owl"], "reference": paths["control"]},
            "student": {"model": model}, "optim": {"batch_size": 4, "max_steps": 6},
            "probe": {"every_n_steps": 3, "n_prompts": 3, "eval_samples": 2, "eval_questions": 3},
            "deepspeed": {"enabled": False}, "ray": {"enabled": False},
            "tracking": {"tracking_uri": server.uri, "experiment": "browser-review", "run_name": "owl-student"},
        }, TrainJobConfig))
        client = mlflow.MlflowClient(server.uri)
        run = client.get_run(summary["mlflow_run_id"])
        verdict = run.data.tags["guard.verdict"]
        assert verdict == summary["verdict"]
        assert "report/report.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        updates = run.data.metrics["guard/updates"]
        train_input = next(i for i in run.inputs.dataset_inputs if i.dataset.name == "owl")
        digest = train_input.dataset.digest
        assert digest == run.data.tags["data.train.sha256"][:DATASET_DIGEST_CHARS]
        # a second run in the experiment, with more updates, for the runs table to sort against
        with MlflowTracker(experiment="browser-review", run_name="more-updates", tracking_uri=server.uri,
                           spool_dir=tmp_path / "spool") as other:
            other.log_outcome_metrics({"updates": updates + 10, "steps": updates + 10})

        driver = _browser(tmp_path)
        try:
            base = f"{server.uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
            driver.get(base)
            _wait_for_text(driver, ["owl-student", "guard.verdict", verdict, "guard/action_code", "train/loss"])
            _screenshot(driver, tmp_path, "run_overview.png")

            driver.get(f"{base}/artifacts/report/report.html")
            _wait_for_text(driver, ["report/report.html", "drift.png", "trait_rates.png"])
            from selenium.webdriver.common.by import By

            deadline = time.monotonic() + 30
            while not driver.find_elements(By.TAG_NAME, "iframe") and time.monotonic() < deadline:
                time.sleep(0.5)
            _screenshot(driver, tmp_path, "run_report_artifact.png")
            driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
            report_text = _wait_for_text(driver, ["trait_guard run report", "Drift over steps", verdict.upper()])
            assert "Provenance of the training data" in report_text and "owl" in report_text
            images = driver.find_elements(By.TAG_NAME, "img")
            assert images and all(int(img.get_attribute("naturalWidth")) > 100 for img in images)  # plots decoded
            driver.switch_to.default_content()

            # the runs table: the Dataset column shows the training data's name and digest
            driver.set_window_size(2400, 1400)  # the table virtualises columns: room for the added one
            driver.get(f"{server.uri}/#/experiments/{run.info.experiment_id}/runs")
            _wait_for_text(driver, ["Dataset", "owl-student", "more-updates", f"owl ({digest})"])
            # the numeric outcome as a column (the Columns menu lists the run's metrics), then sorted by it
            next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Columns").click()
            _wait_until(lambda: next(e for e in driver.find_elements(By.XPATH, "//*[normalize-space(text())="
                                                                     "'guard/updates']") if e.is_displayed()),
                        "guard/updates in the Columns menu").click()
            from selenium.webdriver.common.keys import Keys

            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            _wait_until(lambda: _column_header(driver, "guard/updates"), "a guard/updates column")
            names = ["owl-student", "more-updates"]
            _wait_until(lambda: _table_order(driver, names) == ["more-updates", "owl-student"],
                        "newest run first")  # the default order: created, newest first
            _wait_until(lambda: _column_values(driver, "guard/updates") == [updates + 10, updates],
                        "the runs' guard/updates values in the column")
            # a click on its header sorts by it (descending first), a second click ascending
            _click_column_header(driver, "guard/updates")
            _wait_until(lambda: "guard%2Fupdates" in driver.current_url and "orderByAsc=false" in driver.current_url,
                        "the sort key guard/updates, descending, in the page's URL")
            _wait_until(lambda: _table_order(driver, names) == ["more-updates", "owl-student"],
                        "runs sorted by guard/updates, descending")
            _click_column_header(driver, "guard/updates")
            _wait_until(lambda: _table_order(driver, names) == ["owl-student", "more-updates"],
                        "runs sorted by guard/updates, ascending (the reverse of the default order)")
            assert _column_values(driver, "guard/updates") == [updates, updates + 10]
            assert "orderByAsc=true" in driver.current_url
            _screenshot(driver, tmp_path, "runs_table_sorted.png")
        finally:
            driver.quit()
