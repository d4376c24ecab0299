"""Open Snakemake's HTML report in Debian's headless Chromium, as a reader would, and look.

Used by tests/test_workflow.py, and as a script for the README's screenshot:
    python tests/browser.py results/report.html results/report.png
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Flags a closed network needs: without them Chromium keeps trying to reach Google's hosts.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000"]


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    # decided on what is missing: a selenium that is installed but fails to import is a failure
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)) and not shutil.which(Path(path).name):
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


@dataclass
class Seen:
    """What a reader of the report saw."""

    home_text: str = ""
    table_cells: list[list[str]] = field(default_factory=list)  # the tables' visible rows, in order
    plots: dict[str, tuple[int, bool]] = field(default_factory=dict)  # label -> (width px, shown)
    errors: list[str] = field(default_factory=list)  # the browser console's SEVERE entries


def look(report: Path, screenshot: Path | None = None, timeout: float = 20.0) -> Seen:
    """Load the report, read its home page, open the tables page and every plot."""
    from selenium import webdriver
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or CHROMEDRIVER),
                              options=options)
    wait = WebDriverWait(driver, timeout)
    # The page animates its menus (CSS transitions): a click can land while a row is still sliding
    # in, on whatever is under the pointer then. Retry a reader's click until the element is hit.
    patient = WebDriverWait(driver, timeout, ignored_exceptions=(ElementClickInterceptedException,))

    def click(element) -> None:
        patient.until(lambda _: element.click() is None)

    seen = Seen()
    try:
        category = "(//*[text()='{}'])[1]"

        def home() -> None:  # the page's own navigation is a script: start each look afresh
            driver.get(report.resolve().as_uri())
            wait.until(ec.element_to_be_clickable((By.XPATH, category.format("Tables"))))

        def show(category_name: str, label: str) -> None:
            home()
            click(driver.find_element(By.XPATH, category.format(category_name)))
            row = wait.until(ec.presence_of_element_located((By.XPATH, f"//td[text()='{label}']/..")))
            click(row.find_element(By.CSS_SELECTOR, "[iconname='eye']"))

        home()
        seen.home_text = driver.find_element(By.TAG_NAME, "body").text
        show("Tables", "the three tables")
        frame = wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        driver.switch_to.frame(frame)
        rows = wait.until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, "table tr")))
        seen.table_cells = [[c.text for c in r.find_elements(By.XPATH, "./th|./td")] for r in rows
                            if r.is_displayed()]
        driver.switch_to.default_content()
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))

        home()
        click(driver.find_element(By.XPATH, category.format("Plots")))
        labels = [td.text for td in wait.until(ec.presence_of_all_elements_located(
            (By.XPATH, "//td[following-sibling::td//*[@iconname='eye']]")))]
        for label in labels:
            show("Plots", label)
            time.sleep(0.3)  # the image is swapped in by the page's script
            image = wait.until(ec.presence_of_element_located(
                (By.CSS_SELECTOR, "img[src^='data:image/png']")))
            width = driver.execute_script("return arguments[0].naturalWidth", image)
            seen.plots[label] = (int(width), image.is_displayed())
        seen.errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    return seen


if __name__ == "__main__":
    if reason := missing():
        sys.exit(reason)
    result = look(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(f"plots: {result.plots}\ntable rows: {len(result.table_cells)}\nerrors: {result.errors}")
