"""Review in the MLflow UI, in a real browser: a real `mlflow server` on loopback, a small guarded
pipeline logging to it over HTTP, and headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) opening the run: the guard metrics, the verdict tag and the report artifact must be visible.
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
        finally:
            driver.quit()
