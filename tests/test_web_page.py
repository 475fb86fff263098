"""The web page as a person uses it: headless Chromium (Debian's, driven by Playwright) against the real service
on a `polyrec train` artifact, over HTTP. A deep link shows a known user's list as the API gives it; a like
reaches the feedback log and takes the item out of the next list; a rating sent from the keyboard is logged with
its value; a new item added on the page is recommended for its description; the page fits a phone's width.

Screenshots go to ``$POLYREC_SCREENSHOT_DIR`` when set (README's docs/web-page.png comes from there), else to
the test's temporary folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from data import schema
from data.feedback_log import read_feedback_log
from serve.runner import Service
from tests.test_loop import API_KEY, cluster, known_users, start  # noqa: F401  (cluster: this module's Ray instance)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cluster")]

CHROMIUM = "/usr/bin/chromium"
#: Headless, and nothing that would reach the network or start services the sandboxed test machine lacks.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
K = 10


@pytest.fixture(scope="module")
def service(trained_run, tmp_path_factory) -> Service:
    # A rating scale of the service's own (1-10, not the artifact's 1-5): the page's rating choices follow /v1/model.
    return start(tmp_path_factory.mktemp("web"), trained_run.artifact, "colocated", rating_range=(1.0, 10.0))


@pytest.fixture(scope="module")
def browser() -> Browser:
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser test needs Debian's chromium at /usr/bin/chromium: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("POLYREC_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shown_titles(page: Page) -> list[str]:
    return page.locator("#items > li h3").all_inner_texts()


def save_key(page: Page) -> None:
    page.get_by_label("Key", exact=True).fill(API_KEY)
    page.get_by_role("button", name="Save the key").click()
    expect(page.locator("#key-status")).to_have_text("Saved in this browser.")


def logged(service: Service, **match: str) -> list[dict]:
    rows = read_feedback_log(service.config.feedback.path, service.config.feedback_wal_dir()).to_pylist()
    return [row for row in rows if all(row[field] == value for field, value in match.items())]


def test_a_deep_link_shows_the_users_list_and_a_like_changes_it(service, browser, trained_run, screenshots):
    user = known_users(trained_run.data)[0]
    expected = httpx.post(f"{service.url}/v1/recommend", json={"user_id": user, "k": K}, timeout=60).json()
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(f"{service.url}/?user={user}")

    expect(page.locator("#items > li")).to_have_count(K)
    assert shown_titles(page) == [item["title"] for item in expected["items"]]
    first = expected["items"][0]
    card = page.locator("#items > li").first
    expect(card.locator(".figures")).to_contain_text(f"Predicted rating{first['rating']:.1f}p(like){first['p_like']:.2f}")
    catalogue = {row["item_id"]: row for row in pq.read_table(Path(trained_run.data) / schema.ITEMS_DIR, columns=["item_id", "year", "genres"]).to_pylist()}
    year, genres = catalogue[first["item_id"]]["year"], catalogue[first["item_id"]]["genres"]
    assert (first["year"], first["genres"]) == (year, genres)
    expect(card.locator(".meta")).to_have_text(" · ".join([*([str(year)] if year else []), ", ".join(genres)]))
    explained = next(item for item in expected["items"] if item["because"])
    because = page.locator("#items > li").nth(expected["items"].index(explained)).locator(".because")
    expect(because).to_have_text("Because of " + ", ".join(reason["title"] for reason in explained["because"]))
    recorded = json.loads((Path(trained_run.artifact) / "artifact.json").read_text())
    expect(page.locator("#model-version")).to_have_text(recorded["model_version"])
    expect(page.locator("#metrics thead th")).to_have_text(["", *recorded["metrics"]])
    test_ndcg = page.locator("#metrics tbody tr").filter(has=page.get_by_role("rowheader", name="NDCG@10", exact=True))
    assert float(test_ndcg.locator("td").last.inner_text()) == pytest.approx(recorded["metrics"]["test"]["NDCG@10"], abs=5e-5)  # shown to 4 places
    page.screenshot(path=screenshots / "web-page.png", full_page=True)

    # Without the key the write is refused and the page says how to fix it; with it the like is logged.
    card.get_by_role("button", name=f"Like {first['title']}", exact=True).click()
    expect(page.locator("#status")).to_contain_text("401")
    expect(page.locator("#status")).to_contain_text("Set the API key below.")
    save_key(page)
    card.get_by_role("button", name=f"Like {first['title']}", exact=True).click()
    expect(page.locator("#status")).to_have_text(f"Liked {first['title']}. {K} recommendations for {user}.")
    assert first["title"] not in shown_titles(page) and len(shown_titles(page)) == K
    [like] = logged(service, event="like", user_id=user, item_id=first["item_id"])
    deadline = time.monotonic() + 30  # impressions reach the log in the background
    while not logged(service, event="impression", request_id=like["request_id"], item_id=first["item_id"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert logged(service, event="impression", request_id=like["request_id"], item_id=first["item_id"])  # the list the like was given on

    # From the keyboard: a rating of 2 for the new first item, then Tab to its Rate button and Enter.
    rated = shown_titles(page)[0]
    rating = page.get_by_label(f"Your rating of {rated}")
    expect(rating.locator("option")).to_have_text([f"{r} ★" for r in range(10, 0, -1)])
    rating.focus()
    rating.select_option("2")
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name=f"Rate {rated}", exact=True)).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_have_text(f"Rated 2 ★: {rated}. {K} recommendations for {user}.")
    [rate] = logged(service, event="rate", user_id=user)
    assert rate["value"] == 2.0 and rated not in shown_titles(page)
    page.close()


def test_an_item_added_on_the_page_is_recommended_for_its_description(service, browser, screenshots):
    text = "Robots Sing in Space: a musical about singing robots on a starship. Genres: Musical, Sci-Fi."
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.goto(service.url)
    save_key(page)
    page.get_by_label("Item id").fill("robot-musical")
    page.get_by_label("Title").fill("Robots Sing")
    page.get_by_label("Description").fill(text)
    page.get_by_role("button", name="Add the item").click()
    expect(page.locator("#register-status")).to_have_text("Added Robots Sing (robot-musical): it can be recommended now.")

    page.get_by_label("Interests").fill(text)
    page.get_by_role("button", name="Recommend").click()
    expect(page.locator("#items > li")).to_have_count(K)
    assert "Robots Sing" in shown_titles(page)
    visitor = page.get_by_label("User id").input_value()
    assert visitor.startswith("visitor-") and f"user={visitor}" in page.url  # a link that shows this list again
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    page.screenshot(path=screenshots / "web-page-phone.png", full_page=True)
    page.close()
