"""The dashboard driven in Debian's headless Chromium (Playwright, no downloaded browser)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.dashboard import create_dashboard_app
from daemon.db import lineage
from daemon.stage_specs import CORE_STAGES
from ops.screenshot_dashboard import CHROMIUM, launch_chromium, serve_in_background

from .conftest import TOKEN, Seeded


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium chromium-driver` (ops/test.sh does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser: Any, seeded: Seeded) -> Iterator[Any]:
    with serve_in_background(create_dashboard_app(seeded.settings, seeded.sessions)) as base:
        context = browser.new_context(base_url=base)
        tab = context.new_page()
        tab.set_default_timeout(15_000)
        yield tab
        context.close()


def test_the_lineage_graph_shows_the_seeded_checkpoints_with_the_champion_highlighted(page: Any, seeded: Seeded) -> None:
    page.goto("/")
    drawn = page.eval_on_selector_all("#lineage-graph .node", "nodes => nodes.map(n => [n.dataset.checkpoint, n.getAttribute('class')])")
    assert {cid for cid, _ in drawn} == {c.id for c in seeded.checkpoints()}
    champion = page.locator("#lineage-graph .node.champion")
    assert champion.count() == 1 and champion.get_attribute("data-checkpoint") == seeded.champion()
    assert page.locator("#champion").inner_text() == seeded.champion()
    rejected = {c.id for c in seeded.checkpoints() if c.status.value == "rejected"}
    assert {cid for cid, css in drawn if "rejected" in css} == rejected
    # greyed: the rejected nodes' computed fill differs from the champion's
    grey = page.eval_on_selector("#lineage-graph .node.rejected circle", "c => getComputedStyle(c).fill")
    green = page.eval_on_selector("#lineage-graph .node.champion circle", "c => getComputedStyle(c).fill")
    assert grey != green


def test_clicking_promote_with_the_token_changes_the_champion(page: Any, seeded: Seeded) -> None:
    target = seeded.promotable()
    page.goto("/")
    page.click(f'#lineage-graph .node[data-checkpoint="{target}"]')  # the graph fills the form
    assert page.input_value("#checkpoint") == target
    page.fill("#token", TOKEN)
    page.fill("#reason", "chosen in the browser")
    with page.expect_navigation():
        page.click("#promote-button")
    assert seeded.champion() == target
    assert page.locator("#champion").inner_text() == target
    assert "manual_promotion" in page.locator("#notice").inner_text()
    (event,) = seeded.events(lineage.MANUAL_PROMOTION_EVENT)
    assert event.actor == "dashboard@127.0.0.1" and event.reason == "chosen in the browser"


def test_clicking_promote_without_the_token_is_refused_with_401_and_nothing_changes(page: Any, seeded: Seeded) -> None:
    before = seeded.champion()
    page.goto("/")
    page.fill("#checkpoint", seeded.promotable())
    with page.expect_response(lambda r: r.url.endswith("/actions/promote")) as answer:
        page.click("#promote-button")
    assert answer.value.status == 401
    assert "token is required" in page.locator("#message").inner_text()
    assert seeded.champion() == before
    assert seeded.events(lineage.MANUAL_PROMOTION_EVENT) == []


def test_rollback_button_restores_the_previous_champion(page: Any, seeded: Seeded) -> None:
    before = seeded.champion()
    page.goto("/")
    expected = page.get_attribute("#rollback-to", "placeholder")
    page.fill("#token", TOKEN)
    with page.expect_navigation():
        page.click("#rollback-button")
    assert seeded.champion() == expected != before
    (event,) = seeded.events(lineage.ROLLBACK_EVENT)
    assert event.previous_checkpoint_id == before


def test_an_iteration_page_renders_its_charts(page: Any) -> None:
    page.goto("/iterations/3")
    assert page.locator("#iteration-id").inner_text() == "3"
    assert page.locator("#chart-iteration-scores rect.bar").count() >= 1
    assert page.locator("#chart-iteration-stages rect.bar").count() == len(CORE_STAGES)
