"""The report in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

Opened from file:// as a user opens an offline report. Skipped when no `chromium` is on PATH or
the playwright package is missing (`pip install -e .[dev]`; `apt-get install chromium`).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from support_evaluate import scored_eval_dir

from selma_toolkit.evaluate import tally_files, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
# Flags known to work on these machines (no sandbox as root, no background network on a closed network).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-report")
    return write_report(scored_eval_dir(root), root / "report").parent


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


def open_page(browser, url, errors):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, wait_until="load")
    return page


def test_report_loads_without_errors_and_shows_every_image(browser, report, tmp_path):
    errors: list[str] = []
    page = open_page(browser, (report / "index.html").as_uri(), errors)
    page.wait_for_function("document.body.hasAttribute('data-images-broken')")
    count = page.locator("img").count()
    assert count > 10
    assert page.get_attribute("body", "data-images-loaded") == str(count)
    assert page.get_attribute("body", "data-images-broken") == "0"
    assert not page.locator("#image-check").is_visible()
    assert page.locator("table").first.is_visible() and errors == []
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

    # The check can fail: a moved image is reported on the page.
    moved = tmp_path / "moved"
    shutil.copytree(report, moved)
    next(iter((moved / "images").rglob("*.png"))).unlink()
    page = open_page(browser, (moved / "index.html").as_uri(), [])
    page.wait_for_function("document.body.hasAttribute('data-images-broken')")
    assert page.get_attribute("body", "data-images-broken") == "1"
    assert "1 of" in page.locator("#image-check").inner_text()


def test_human_eval_page_records_choices_and_exports_answers_that_tally(browser, report, tmp_path):
    html = (report / "human-eval.html").read_text()
    pairs = json.loads(re.search(r'<script id="pairs" type="application/json">(.*?)</script>', html, re.S).group(1))
    errors: list[str] = []
    page = open_page(browser, (report / "human-eval.html").as_uri(), errors)
    assert page.locator("#progress-text").inner_text() == f"0 of {len(pairs)} answered"
    # Prefer the merged LoRA on the first pair, tie on the second, the base on the rest.
    wanted = ["merged:selma", None] + ["base"] * (len(pairs) - 2)
    for number, (pair, choice) in enumerate(zip(pairs, wanted)):
        assert page.locator("#prompt").inner_text() == pair["prompt"]
        assert page.get_attribute("#left-image", "src") == pair["left"]["src"]
        button = (
            "#choose-tie"
            if choice is None
            else ("#choose-left" if pair["left"]["variant"] == choice else "#choose-right")
        )
        page.click(button)
        assert page.locator("#progress-text").inner_text() == f"{number + 1} of {len(pairs)} answered"
        if number == 1:  # answers survive a reload (kept in localStorage)
            # Chromium passes a page's localStorage writes to the browser process asynchronously: a
            # person reloads seconds later, a test within milliseconds. Wait until another tab of the
            # same page sees both answers, then reload.
            other = page.context.new_page()
            other.goto(page.url, wait_until="load")
            other.wait_for_function(
                "Object.keys(JSON.parse(localStorage.getItem("
                "'selma-human-eval:' + document.body.getAttribute('data-study')) || '{}')).length === 2"
            )
            other.close()
            page.reload(wait_until="load")
            assert page.locator("#progress-text").inner_text() == f"2 of {len(pairs)} answered"
    assert page.locator("#finished").is_visible()
    with page.expect_download() as download:
        page.click("#export-final")
    exported = tmp_path / "answers.json"
    download.value.save_as(exported)
    [tally] = tally_files([exported])
    assert (tally.variant, tally.baseline) == ("merged:selma", "base")
    assert (tally.win, tally.tie, tally.lose) == (1, 1, len(pairs) - 2)
    assert errors == []


def test_charts_fit_the_page_column_in_a_1400_px_window_and_scale_down_in_a_narrow_one(browser, tmp_path):
    """A run with many variants (merges, baselines) draws wide charts; each must fit its column, the
    legend included (the chart once was 1840 px wide and its legend was cut off in a 1400 px window)."""
    from selma_toolkit.evaluate import read_scores

    eval_dir = scored_eval_dir(tmp_path)
    document = read_scores(eval_dir / "scores.json")
    extra = [f"merged:m{k}" for k in range(8)]
    wide = dict(
        document,
        variants=[*document["variants"], *extra],
        aggregate={**document["aggregate"], **{v: document["aggregate"]["merged:selma"] for v in extra}},
        items=[
            *document["items"],
            *[dict(i, variant=v) for v in extra for i in document["items"] if i["variant"] == "merged:selma"],
        ],
    )
    index = write_report(wide, tmp_path / "report", eval_dir=eval_dir)
    for width, scaled in ((1400, False), (800, True)):
        context = browser.new_context(viewport={"width": width, "height": 900})
        page = context.new_page()
        page.goto(index.as_uri(), wait_until="load")
        charts = page.evaluate("""() => {
            const body = document.body.getBoundingClientRect(), style = getComputedStyle(document.body);
            const right = body.right - parseFloat(style.paddingRight);
            return Array.from(document.querySelectorAll('figure img')).map(img => {
                const box = img.getBoundingClientRect();
                return {left: box.left, right: box.right, width: box.width, natural: img.naturalWidth, column: right};
            });
        }""")
        assert len(charts) == len(document["scorers"])
        for chart in charts:
            assert chart["natural"] > 0 and chart["right"] <= chart["column"] + 0.5, (width, chart)
            assert (chart["width"] < chart["natural"]) == scaled, (width, chart)  # whole at 1400 px, scaled at 800
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        context.close()
