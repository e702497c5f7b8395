"""The search page of `./run.sh serve` in a real headless browser (Debian's chromium under
Playwright, tests/browser.py): typing a tag suggests and shows results whose thumbnails load, a
photo comes first, a click shows its neighbours, filters narrow, an unknown tag offers the closest
lemmas, keys are shown as text; and never a console error, CSP violation or failed request."""

import urllib.parse

import pytest

from search.server import create_app
from search.service import Service
from tests import search_outputs as so
from tests.browser import playwright_browser, watch

SETTLED = "() => !['idle', 'loading'].includes(document.body.dataset.state)"
THUMBNAILS_LOADED = (
    "() => document.querySelectorAll('.card img').length > 0 && Array.from("
    "document.querySelectorAll('.card img')).every(i => i.complete && i.naturalWidth > 0)"
)


@pytest.fixture(scope="module")
def service(serve_output):
    return Service(serve_output[0])


@pytest.fixture(scope="module")
def base(service):
    with so.live(create_app(service, allowed_hosts=["127.0.0.1"])) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright_browser() as browser:
        yield browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.problems = watch(page)
    yield page
    context.close()


def keys_shown(page) -> list:
    return page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.key)")


def api_keys(service, answer) -> list:
    return [r["key"] for r in answer["results"]]


def unexpected(problems) -> list:
    """The problems but the 404 of an /api/search the test expects (Chromium logs every 404 of a
    fetch as a console error: the page handles it)."""
    return [p for p in problems if "404" not in p or "/api/search?" not in p]


def settle(page):
    page.wait_for_function(SETTLED)
    return page.evaluate("document.body.dataset.state")


def test_typing_a_tag_suggests_it_and_shows_results_with_their_thumbnails(page, base, service):
    page.goto(base)
    assert settle(page) == "ready"
    page.locator("#tag").press_sequentially("Golden re", delay=30)
    first = page.locator("#suggestions li").first
    first.wait_for()
    assert first.locator(".term").inner_text() == "golden retriever"
    first.click()
    assert settle(page) == "results"
    page.wait_for_function(THUMBNAILS_LOADED)
    assert keys_shown(page) == api_keys(service, service.by_tag("golden_retriever", 48))
    assert urllib.parse.urlparse(page.url).query == "tag=golden_retriever"
    assert "golden_retriever" in page.locator("#status").inner_text()
    assert page.problems == []


def test_an_uploaded_photo_comes_first(page, base, serve_output, tmp_path):
    photo = tmp_path / "upload.jpg"
    photo.write_bytes(serve_output[1]["wds/s2"])
    page.goto(base)
    settle(page)
    page.set_input_files("#photo", str(photo))
    page.wait_for_function("() => document.body.dataset.state === 'results'")
    page.wait_for_function(THUMBNAILS_LOADED)
    assert keys_shown(page)[0] == "wds/s2"
    assert page.locator(".card .score").first.inner_text() == "1.000"
    assert page.locator("#photo-preview").is_visible()
    assert page.problems == []


def test_clicking_a_result_shows_its_neighbours_and_the_url_is_a_deep_link(page, base, service):
    page.goto(base + "?tag=dog")
    assert settle(page) == "results"
    second = page.locator(".card").nth(1)
    key = second.get_attribute("data-key")
    second.click()
    page.wait_for_url(lambda url: "key=" in url)
    assert settle(page) == "results"
    page.wait_for_function(THUMBNAILS_LOADED)
    neighbours = api_keys(service, service.by_key(key, 48))
    assert keys_shown(page) == neighbours and key not in neighbours
    page.goto(page.url)  # the deep link alone shows the same
    assert settle(page) == "results" and keys_shown(page) == neighbours
    page.go_back()
    page.wait_for_url(lambda url: "tag=dog" in url)
    assert settle(page) == "results"
    assert page.problems == []


def test_a_category_filter_narrows_the_results(page, base, service):
    page.goto(base + "?tag=crane")
    assert settle(page) == "results"
    assert keys_shown(page) == api_keys(service, service.by_tag("crane", 48))
    page.locator("#facets .chip", has_text="dog").click()
    page.wait_for_url(lambda url: "filter=" in url)
    assert settle(page) == "results"
    dogs = set(api_keys(service, service.by_tag("dog", 48)))
    assert set(keys_shown(page)) == dogs
    assert page.locator("#active-filters .chip").inner_text().startswith("dog")
    page.locator("#active-filters .chip").click()
    page.wait_for_url(lambda url: "filter=" not in url)
    assert settle(page) == "results" and set(keys_shown(page)) > dogs
    assert page.problems == []


def test_an_unknown_tag_offers_the_closest_lemmas(page, base):
    page.goto(base + "?tag=golden_retriver")
    assert settle(page) == "unknown"
    assert "unknown tag" in page.locator("#status").inner_text()
    page.locator(".did-you-mean button", has_text="golden_retriever").click()
    page.wait_for_url(lambda url: "tag=golden_retriever" in url)
    assert settle(page) == "results"
    assert unexpected(page.problems) == [] and page.problems  # the 404 was the one expected


def test_no_results_and_a_key_that_is_not_there_are_clear(page, base):
    page.goto(base + "?tag=n01440764")  # tench: in the label set, in no image
    assert settle(page) == "empty" and "No indexed image" in page.locator("#status").inner_text()
    page.goto(base + "?key=" + urllib.parse.quote("no/such key"))
    assert settle(page) == "error" and "is not in the index" in page.locator("#status").inner_text()
    assert unexpected(page.problems) == []


def test_keys_are_shown_as_text_never_run(browser, serve_output, tmp_path):
    """A key holding HTML and script: shown literally in the grid and the status line. (The
    records' thumbnails are refused: their Examples hold the keys without the prefix.)"""
    from search.index import build_index

    hostile = "<img src=x onerror=alert(1)>\"'<script>alert(2)</script>/"
    output = so.retag(serve_output[0], str(tmp_path / "hostile"), key_prefix=hostile)
    build_index(output, log_every_secs=0)
    with so.live(create_app(Service(output), allowed_hosts=["127.0.0.1"])) as url:
        context = browser.new_context()
        page = context.new_page()
        problems = watch(page)
        page.goto(url + "?key=" + urllib.parse.quote(hostile + "tf/r1"))
        assert settle(page) == "results"
        assert all(k.startswith(hostile) for k in keys_shown(page))
        assert page.locator(".card .key").first.inner_text().startswith(hostile)
        assert hostile in page.locator("#status").inner_text()
        assert page.evaluate("document.querySelectorAll('script').length") == 1
        assert [p for p in problems if "/api/thumbnail/" not in p] == []
        context.close()
