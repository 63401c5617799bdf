"""History across devices in the browser: with a token, the sidebar lists the server's
conversations for that user, so two fresh browsers (no shared localStorage) signed in with the
same token see the same list, and a rename in one shows in the other after a reload."""

from __future__ import annotations

import os
import re

import pytest

CHROMIUM = os.environ.get("NEXLM_CHROMIUM", "/usr/bin/chromium")
assert os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK), \
    f"{CHROMIUM} not found: apt-get install chromium (or set NEXLM_CHROMIUM)"

from playwright.sync_api import expect  # noqa: E402

from e2e_support import Server, browser, fake, make_page, parent_site  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.e2e

TOKEN = "history-token-0123456789"
IDLE = "() => window.nexlm && !window.nexlm.state.streaming && !window.nexlm.state.pending"


@pytest.fixture
def auth_server(tmp_path, fake, parent_site):
    s = Server(tmp_path, fake.port, parent_site.origin, extra=f'\n[auth]\ntokens = ["{TOKEN}"]\n')
    s.start()
    yield s
    s.stop()


def signed_in(make_page, url):
    """A fresh browser context (its own cookies and localStorage), signed in with the token."""
    page = make_page(url)
    expect(page).to_have_url(re.compile(r"/login$"))
    page.get_by_label("Access token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#conn")).to_have_attribute("data-state", "online")
    return page


def names(page):
    return page.locator("#conv-list .conv-name")


def test_same_token_two_browsers_same_list_and_renames(auth_server, make_page):
    first = signed_in(make_page, auth_server.url)
    for text in ("history across devices", "a second conversation"):
        first.locator("#new-chat").click()
        first.locator("#input").fill(text)
        first.locator("#input").press("Enter")
        first.wait_for_function(IDLE, timeout=20000)
        expect(first.locator("article.msg.assistant .msg-body").last).to_have_text(f"Echo: {text}")
    expect(names(first)).to_have_text(["a second conversation", "history across devices"])

    second = signed_in(make_page, auth_server.url)  # nothing local: the list comes from the server
    expect(names(second)).to_have_text(["a second conversation", "history across devices"])
    second.locator("#conv-list .conv-open", has_text="history across devices").click()
    expect(second.locator("article.msg.user .user-text")).to_have_text(["history across devices"])
    expect(second.locator("article.msg.assistant .msg-body")).to_have_text(["Echo: history across devices"])
    expect(second.locator("#conv-list [aria-current='page'] .conv-name")).to_have_text("history across devices")

    session = second.evaluate("() => window.nexlm.state.conv.session")
    status = second.evaluate("""async (sid) => (await fetch('api/sessions/' + sid, {
        method: 'PATCH', credentials: 'same-origin', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({title: 'Renamed on the second browser'})})).status""", session)
    assert status == 200
    first.reload()
    expect(names(first)).to_have_text(["a second conversation", "Renamed on the second browser"])
    first.locator("#conv-list .conv-open", has_text="Renamed on the second browser").click()
    expect(first.locator("#conv-title")).to_have_text("Renamed on the second browser")
    first.errors.check()
    second.errors.check()


def test_without_an_identity_the_sidebar_keeps_its_local_list(tmp_path, fake, parent_site, make_page):
    s = Server(tmp_path, fake.port, parent_site.origin)
    s.start()
    try:
        page = make_page(s.url)
        expect(page.locator("#conn")).to_have_attribute("data-state", "online")
        page.locator("#input").fill("only in this browser")
        page.locator("#input").press("Enter")
        page.wait_for_function(IDLE, timeout=20000)
        expect(names(page)).to_have_text(["only in this browser"])
        other = make_page(s.url)  # another browser, no identity: nothing shared
        expect(other.locator("#conn")).to_have_attribute("data-state", "online")
        expect(other.locator("#conv-empty")).to_be_visible()
        page.errors.check()
        other.errors.check()
    finally:
        s.stop()
