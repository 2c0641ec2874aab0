"""The MLflow UI tells a version's whole story: checked the way a reviewer would, in a real browser.

Headless Chromium (Debian's package, driven by Playwright) opens the MLflow
tracking server of the session's local stack after the scheduled path has
promoted an update, and reads what a person would see: the `champion` alias
on the registered model's page; on the champion version's page its lineage
tags, gate verdict with reasons and cost; and the drift report and gate
artifacts on the runs' pages. Screenshots go to the test's tmp directory (and
to docs/ with REFIT_UPDATE_DOCS=1, for the README).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from server import stack_session
from server.stack_session import MODEL, ROOT

pytestmark = [pytest.mark.ui, pytest.mark.timeout(1500)]

CHROMIUM = Path(os.environ.get("REFIT_CHROMIUM", "/usr/bin/chromium"))
# Offline and quiet: nothing beyond 127.0.0.1, no sandbox (CI runs as root), no GPU.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LINEAGE = ("refit.parent_version", "refit.train_data_fingerprint", "refit.drift_run_id", "refit.code_revision",
           "refit.base_model_sha256", "refit.policy_hash")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # a test dependency (pyproject's test extra)

    if not CHROMIUM.is_file():  # a failure under CI=true (tests/allowed_skips.py)
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set REFIT_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def promoted(stack, deployed):
    return stack_session.scheduled_update(stack)


def _open(page, url: str, wait_text: str) -> str:
    page.goto(url, wait_until="load")
    page.get_by_text(wait_text).first.wait_for()
    close = page.get_by_role("button", name="Close")  # the assistant side panel hides half the page
    if close.count():
        close.first.click()
    return page.inner_text("body").replace("\xa0", " ")


def _preview(page, artifact: str) -> str:
    """Click an HTML artifact in the run's artifact tree; the HTML the preview pane shows."""
    page.get_by_text(artifact).first.click()
    frame = page.frame_locator("iframe.mlflow-html-iframe").first
    frame.locator("body").wait_for()
    (preview,) = [f for f in page.frames if f.url.startswith("blob:")]
    return preview.content()


def _shoot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("REFIT_UPDATE_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(path, ROOT / "docs" / path.name)


def test_model_page_shows_the_champion_alias(stack, promoted, page, tmp_path):
    champion = stack.mlflow().get_model_version_by_alias(MODEL, "champion")
    text = _open(page, f"{stack.mlflow_uri}/#/models/{MODEL}", "@ champion")
    assert MODEL in text
    assert "@ champion" in text and "@ previous" in text
    # The alias sits on the promoted version's row.
    row = page.get_by_role("row").filter(has_text=f"Version {champion.version}").filter(has_text="champion")
    assert row.count() == 1
    _shoot(page, tmp_path / "mlflow-model-aliases.png")


def test_version_page_shows_lineage_gate_verdict_and_cost(stack, promoted, page, tmp_path):
    champion = stack.mlflow().get_model_version_by_alias(MODEL, "champion")
    text = _open(page, f"{stack.mlflow_uri}/#/models/{MODEL}/versions/{champion.version}", "refit.gate_verdict")
    assert "@ champion" in text
    for key in (*LINEAGE, "refit.gate_verdict", "refit.gate_reasons", "refit.update_cost_usd"):
        assert key in text, key
        assert champion.tags[key] in text, (key, champion.tags[key])
    assert champion.tags["refit.drift_run_id"] == promoted["drift_check"].info.run_id
    assert champion.tags["refit.gate_verdict"] == "passed"
    _shoot(page, tmp_path / "mlflow-version.png")


def test_runs_have_the_drift_report_and_the_gate_artifacts(stack, promoted, page, tmp_path):
    client = stack.mlflow()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    check = promoted["drift_check"]
    experiment = check.info.experiment_id
    text = _open(page, f"{stack.mlflow_uri}/#/experiments/{experiment}/runs/{check.info.run_id}/artifacts",
                 "drift_report.html")
    assert "verdict.json" in text
    # The Evidently report opens in the preview pane: an iframe holding the report's own HTML.
    assert "evidently" in _preview(page, "drift_report.html").lower()
    page.wait_for_timeout(3000)  # let the report's scripts draw before the screenshot
    _shoot(page, tmp_path / "mlflow-drift-report.png")
    text = _open(page, f"{stack.mlflow_uri}/#/experiments/{experiment}/runs/{champion.run_id}/artifacts",
                 "gate.html")
    assert "gate.json" in text
    # The gate table: the verdict, then every rule with its value, limit and result.
    gate = _preview(page, "gate.html")
    assert champion.tags["refit.gate_reasons"] in gate
    assert gate.count("<tr") >= 2
    _shoot(page, tmp_path / "mlflow-gate.png")
