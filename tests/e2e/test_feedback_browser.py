"""The rating page in a real browser (headless Debian chromium through Selenium): log in, rate 20
pairs, half by keyboard and half by click, and find the votes in the database; a tweet holding a
`<script>` shows as text. `UPBEAT_DOCS_SCREENSHOT=1` also saves the page to docs/feedback.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from browser import chromium
from feedback_server import serving

from upbeat.feedback.store import Store

ROOT = Path(__file__).resolve().parents[2]
EVIL = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
PROMPTS = [
    (
        "just got home from work and",
        " i can finally relax with my family",
        " the traffic was awful again",
    ),
    (
        "my phone died in the middle of",
        " a call with my mum, so annoying",
        " the best song, still smiling",
    ),
    ("cant wait for the weekend", " to start, beach here we come!", " but it will rain all day"),
    (
        "finally finished my exams",
        " and i think they went well :)",
        " and i am so tired of everything",
    ),
]
KEYS = ["a", "b", "t", "x", "s", "1", "2", "3", "4", "0"]
KEY_CHOICE = {"a": "a", "1": "a", "b": "b", "2": "b", "t": "tie", "3": "tie"}
KEY_CHOICE |= {"x": "both_bad", "4": "both_bad", "s": "skip", "0": "skip"}
CLICKS = ["a", "b", "tie", "both_bad", "skip", "a", "b", "a", "b", "tie"]


def test_rate_twenty_pairs_by_keyboard_and_click(tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = Store(db)
    token = store.add_rater("ann")
    rows = [
        dict(prompt=EVIL, text_a=f" {EVIL}", text_b=" plain text", model_a="m", model_b="m", seed=0)
    ]
    rows += [
        dict(prompt=p, text_a=a, text_b=b, model_a="models:/upbeat-policy/1",
             model_b="models:/upbeat-policy/1", seed=i)
        for i in range(1, 20)
        for p, a, b in [PROMPTS[i % len(PROMPTS)]]
    ]  # fmt: skip
    for i, row in enumerate(rows):
        row["priority"] = -i  # shown in this order
    ids = store.add_pairs(rows)

    limits = ("--votes-per-minute", "600", "--burst", "30")  # faster than a person reads
    with serving(tmp_path / "page", db, *limits) as (url, _), chromium() as driver:
        # the page is replaced after every vote: an element read mid-navigation is retried
        wait = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])
        driver.get(f"{url}/")  # not logged in: the login page
        wait.until(ec.presence_of_element_located((By.ID, "token"))).send_keys(token)
        driver.find_element(By.ID, "login-button").click()
        wait.until(ec.presence_of_element_located((By.ID, "vote")))

        # the <script> tweet: shown as text, never run
        assert driver.find_element(By.ID, "prompt").text == EVIL
        assert EVIL in driver.find_element(By.ID, "text-a").text
        assert driver.execute_script("return window.pwned") is None

        def current_pair() -> int:
            """The pair on the page, once its shortcuts are live (a key sent before is lost)."""
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#vote[data-keys=ready]")))
            return int(driver.find_element(By.NAME, "pair").get_attribute("value"))

        def rated() -> int:
            return int(driver.find_element(By.ID, "rated").text)

        sent: dict[int, str] = {}
        for n, key in enumerate(KEYS):
            pair = current_pair()
            driver.find_element(By.TAG_NAME, "body").send_keys(key)
            wait.until(lambda d, n=n: rated() == n + 1)
            sent[pair] = KEY_CHOICE[key]
            if n == 1 and os.environ.get("UPBEAT_DOCS_SCREENSHOT") == "1":
                driver.save_screenshot(str(tmp_path / "feedback.png"))
                shutil.copy(tmp_path / "feedback.png", ROOT / "docs" / "feedback.png")
        for n, choice in enumerate(CLICKS, start=len(KEYS)):
            pair = current_pair()
            driver.find_element(By.ID, f"choice-{choice}").click()
            wait.until(lambda d, n=n: rated() == n + 1)
            sent[pair] = choice
        assert driver.find_element(By.ID, "empty").is_displayed()
        assert rated() == 20
        driver.save_screenshot(str(tmp_path / "done.png"))

    votes = store.export()
    assert len(votes) == 20 and {v["rater"] for v in votes} == {"ann"}
    assert {v["pair_id"]: v["choice"] for v in votes} == sent
    assert set(sent) == set(ids)
    store.close()
