"""The MLflow UI shows a study's trials: a real ``mlflow server`` over a study's work dir, read by headless Chromium.

What a person does after ``mfcon study``: open the study's experiment, filter to the
trial runs, add the ``dev_eer`` column. MLflow 3.17 nests child runs under the study run
(collapsed) and shows no metric columns by default (its default columns are Dataset,
Source, Models), so the test filters on ``tags.`mfcon.role` = 'trial'`` through the
URL and picks columns in the "Columns" popover, as a user would. The runs table is an
ag-grid: pinned (run name) and scrolling (metric) cells of one run share ``row-index``.

Needs Debian's ``chromium`` and ``chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver);
without them the test fails and says how to install them.
Screenshot: ``test-artifacts/mlflow_ui.png``.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest
from mlflow_fixtures import (
    REPO,
    BrowserMissing,
    headless_chromium,
    require_chromium,
    run_mlflow_server,
    write_study_store,
)

pytestmark = pytest.mark.slow

SCREENSHOT = REPO / "test-artifacts" / "mlflow_ui.png"
TRIAL_FILTER = "tags.`mfcon.role` = 'trial'"
HIDE_COLUMNS = ("Dataset", "Source", "Models")  # MLflow's default attribute columns
SHOW_COLUMNS = ("dev_eer", "dev_min_dcf", "mfcon.trial_state", "loss.mfcon_weight", "loss.mfcon_blocks")
WAIT_S = 30


@pytest.fixture(scope="module", autouse=True)
def browser_installed():
    """Fail (not skip) before starting anything when the browser is missing."""
    try:
        require_chromium()
    except BrowserMissing as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def study_store(tmp_path_factory):
    return write_study_store(tmp_path_factory.mktemp("runs"), "ui-study")


@pytest.fixture(scope="module")
def mlflow_server(study_store):
    with run_mlflow_server(study_store.workdir) as url:
        yield url


@pytest.fixture
def chromium(tmp_path):
    with headless_chromium(tmp_path / "chromium-profile") as driver:
        yield driver


def runs_url(server: str, experiment_id: str) -> str:
    query = urllib.parse.urlencode({"searchFilter": TRIAL_FILTER, "orderByKey": "metrics.`dev_eer`", "orderByAsc": "true"})
    return f"{server}/#/experiments/{experiment_id}/runs?{query}"


def close_assistant(driver) -> None:
    """MLflow 3 opens an "MLflow Assistant" side panel on first visit; it only narrows the table."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()


def toggle_columns(driver, titles) -> None:
    """Tick or untick columns in the "Columns" popover (searching each, since the tree is virtualised)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT_S)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=column-selection-dropdown]"))).click()
    search = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "input[placeholder='Search columns']")))
    for title in titles:
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(title)
        node = wait.until(ec.element_to_be_clickable((By.XPATH,
            "//div[@data-testid='column-selector-tree']//div[contains(@class,'tree-treenode')]"
            f"[.//span[contains(@class,'tree-title')][normalize-space(.)='{title}']]"
            "//span[contains(@class,'tree-checkbox')]")))
        node.click()
    search.send_keys(Keys.ESCAPE)


def cell_text(driver, row_index: str, col_id: str) -> str:
    from selenium.webdriver.common.by import By

    cell = driver.find_element(By.CSS_SELECTOR, f".ag-center-cols-container div[role=row][row-index='{row_index}'] "
                                                f"div[col-id='{col_id}']")
    return cell.text.strip()


def test_server_serves_the_study(mlflow_server, study_store):
    """The server reads the study's own SQLite store: REST sees the parent run and every trial."""
    body = json.dumps({"experiment_ids": [study_store.experiment_id], "max_results": 100}).encode()
    req = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        names = {r["info"]["run_name"] for r in json.loads(resp.read())["runs"]}
    assert names == {"study-ui-study", *(study_store.run_name(t.trial_id) for t in study_store.trials)}


def test_runs_table_lists_trials_with_eer(mlflow_server, study_store, chromium):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, wait = chromium, WebDriverWait(chromium, WAIT_S)
    names = {t.trial_id: study_store.run_name(t.trial_id) for t in study_store.trials}
    SCREENSHOT.parent.mkdir(exist_ok=True)
    try:
        driver.get(runs_url(mlflow_server, study_store.experiment_id))
        try:
            wait.until(lambda d: all(d.find_elements(By.XPATH, f"//a[normalize-space(.)='{n}']")
                                     for n in names.values()))
        except TimeoutException:
            pytest.fail(f"trial runs {sorted(names.values())} not listed at {driver.current_url} within {WAIT_S}s")
        close_assistant(driver)
        toggle_columns(driver, HIDE_COLUMNS + SHOW_COLUMNS)
        eer_header = "div[role=columnheader][col-id='metrics.`dev_eer`']"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, eer_header))
        assert driver.find_element(By.CSS_SELECTOR, eer_header).text.strip() == "dev_eer"
        for spec in study_store.trials:
            link = driver.find_element(By.XPATH, f"//a[normalize-space(.)='{names[spec.trial_id]}']")
            row = link.find_element(By.XPATH, "./ancestor::div[@role='row'][1]").get_attribute("row-index")
            # the runs table shows a metric's latest value: the eer of the trial's last epoch
            assert float(cell_text(driver, row, "metrics.`dev_eer`")) == pytest.approx(spec.eers[-1])
            assert cell_text(driver, row, "tags.`mfcon.trial_state`") == spec.state
        study_row = driver.find_elements(By.XPATH, "//a[normalize-space(.)='study-ui-study']")
        assert not study_row, "the trial filter should hide the study's parent run"
    finally:
        driver.save_screenshot(str(SCREENSHOT))
