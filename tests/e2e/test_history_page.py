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
from test_accessibility import violations  # noqa: E402

pytestmark = pytest.mark.e2e

TOKEN = "history-token-0123456789"
IDLE = "() => window.nexlm && !window.nexlm.state.streaming && !window.nexlm.state.pending"


@pytest.fixture
def auth_server(tmp_path, fake, parent_site):
    s = Server(tmp_path, fake.port, parent_site.origin, extra=f'\n[auth]\ntokens = ["{TOKEN}"]\n')
    s.start()
    yield s
    s.stop()


def signed_in(make_page, url, **ctx_args):
    """A fresh browser context (its own cookies and localStorage), signed in with the token."""
    page = make_page(url, **ctx_args)
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

    item = second.locator("#conv-list .conv-item", has_text="history across devices")
    item.hover()
    item.get_by_role("button", name="Rename conversation").click()
    field = second.get_by_role("textbox", name="Rename conversation")
    expect(field).to_have_value("history across devices")
    field.fill("  Renamed on the second browser ")
    field.press("Enter")
    expect(names(second)).to_have_text(["a second conversation", "Renamed on the second browser"])
    expect(second.locator("#conv-title")).to_have_text("Renamed on the second browser")
    first.reload()
    expect(names(first)).to_have_text(["a second conversation", "Renamed on the second browser"])
    first.locator("#conv-list .conv-open", has_text="Renamed on the second browser").click()
    expect(first.locator("#conv-title")).to_have_text("Renamed on the second browser")
    first.errors.check()
    second.errors.check()


def test_a_refused_title_is_said_and_changes_nothing(auth_server, make_page):
    page = signed_in(make_page, auth_server.url)
    page.locator("#input").fill("keep this title")
    page.locator("#input").press("Enter")
    page.wait_for_function(IDLE, timeout=20000)
    expect(names(page)).to_have_text(["keep this title"])
    page.locator("#conv-list .conv-item").hover()
    page.get_by_role("button", name="Rename conversation").click()
    page.get_by_role("textbox", name="Rename conversation").fill("x" * 190)
    page.evaluate("() => { const f = document.querySelector('.conv-rename'); f.maxLength = 999; f.value += 'y'.repeat(20); }")
    page.get_by_role("textbox", name="Rename conversation").press("Enter")
    expect(page.locator(".notice").last).to_contain_text("title is too long (210 characters, the limit is 200)")
    expect(names(page)).to_have_text(["keep this title"])
    page.reload()
    expect(names(page)).to_have_text(["keep this title"])
    page.errors.check()


def test_the_server_list_and_the_rename_field_pass_axe(auth_server, make_page):
    page = signed_in(make_page, auth_server.url, bypass_csp=True, reduced_motion="reduce")
    page.locator("#input").fill("slow answer for the running flag")
    page.locator("#input").press("Enter")
    expect(page.locator("#conv-list .conv-running")).to_have_text("replying")
    found = violations(page)
    assert not found, "the server's list with a running reply:\n" + "\n".join(found)
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function(IDLE, timeout=20000)
    expect(page.locator("#conv-list .conv-running")).to_have_count(0)
    page.locator("#conv-list .conv-item").hover()
    page.get_by_role("button", name="Rename conversation").click()
    found = violations(page)
    assert not found, "the rename field:\n" + "\n".join(found)
    page.errors.check()


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
