"""The chat page in a real browser (Debian's Chromium via Playwright) against the real server
(``python app.py`` in a subprocess) and a fake OpenAI-compatible upstream that records what it
was asked. See conftest.py for the fixtures.
"""

from __future__ import annotations

import os
import re

import pytest

CHROMIUM = os.environ.get("NEXLM_CHROMIUM", "/usr/bin/chromium")
# Missing pieces fail the run rather than skip it: a green suite must mean the page was tested.
assert os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK), \
    f"{CHROMIUM} not found: apt-get install chromium (or set NEXLM_CHROMIUM)"

from playwright.sync_api import expect  # noqa: E402

from e2e_support import (  # noqa: E402,F401  (fixtures are used by name)
    SCREENSHOTS, Server, browser, fake, http_json, make_page, own_server, parent_site, server)

pytestmark = pytest.mark.e2e

IDLE = "() => window.nexlm && !window.nexlm.state.streaming && !window.nexlm.state.pending"


def online(page, timeout=15000):
    expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=timeout)


def send(page, text):
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def wait_idle(page, timeout=20000):
    """No reply streaming, no message waiting to be accepted: and the page shows exactly that."""
    page.wait_for_function(IDLE, timeout=timeout)
    expect(page.locator("article.msg.pending, article.msg.streaming, .pending-badge")).to_have_count(0)


def conv(page):
    return page.evaluate("""() => {
        const c = window.nexlm.state.conv;
        return {session: c.session, lastSeq: c.lastSeq,
                messages: c.messages.map(m => ({role: m.role, content: m.content, finish_reason: m.finish_reason,
                                                 pending: !!m.pending, streaming: !!m.streaming}))};
    }""")


def replies(page):
    return page.locator("article.msg.assistant .msg-body")


def upstream_requests(fake, containing):
    return [r for r in fake.requests
            if any(containing in (m.get("content") or "") for m in r.get("messages", []) if m.get("role") == "user")]


def last_user(body):
    return [m for m in body["messages"] if m["role"] == "user"][-1]["content"]


# ------------------------------------------------------------------------------- streaming


def test_streamed_reply_appears_progressively(server, make_page):
    page = make_page(server.url)
    online(page)
    send(page, "slow progressive")
    body = replies(page).last
    expect(page.locator("article.msg.assistant.streaming")).to_have_count(1)
    expect(body).to_contain_text("word5")
    early = body.inner_text()
    assert "word60" not in early
    expect(body).to_contain_text("word25")
    later = body.inner_text()
    assert len(later) > len(early)
    assert later.split()[:5] == early.split()[:5]
    # the streaming reply is announced politely, and busy until it ends
    assert page.locator("article.msg.assistant.streaming").get_attribute("aria-live") == "polite"
    page.locator("#stop").click()
    wait_idle(page)
    page.errors.check()


def test_stop_keeps_partial_text(server, make_page):
    page = make_page(server.url)
    online(page)
    send(page, "slow please stop me")
    body = replies(page).last
    expect(body).to_contain_text("word8")
    page.keyboard.press("Escape")  # Esc stops, like the Stop button
    wait_idle(page)
    msg = page.locator("article.msg.assistant").last
    expect(msg.locator(".badge")).to_have_text("Stopped")
    shown = body.inner_text().split()
    assert "word8" in shown and "word399" not in shown
    c = conv(page)
    status, data = server.session(c["session"])
    assert status == 200
    last = data["history"][-1]
    assert last["role"] == "assistant" and last["finish_reason"] == "stopped"
    assert last["content"].split() == shown  # exactly the text that was streamed
    assert c["messages"][-1]["content"] == last["content"]
    page.errors.check()


def test_long_reply_renders_incrementally(server, make_page):
    page = make_page(server.url)
    online(page)
    page.evaluate("""() => {
        window.__longest = 0;
        new PerformanceObserver((list) => {
            for (const e of list.getEntries()) window.__longest = Math.max(window.__longest, e.duration);
        }).observe({type: 'longtask', buffered: false});
    }""")
    send(page, "long 8000")
    # completed blocks are frozen while the reply streams (not re-rendered each frame)
    page.wait_for_function("() => document.querySelectorAll('.msg.streaming .md-frozen .md-chunk').length > 3",
                           timeout=20000)
    wait_idle(page, 60000)
    text = replies(page).last.inner_text()
    assert text.rstrip().endswith("w8000")
    assert text.count("w7999") == 1
    # no frame-blocking work while 8000 pieces streamed in (a quadratic renderer takes seconds)
    assert page.evaluate("window.__longest") < 300
    page.errors.check()


# ------------------------------------------------------------------------------- controls


def test_regenerate_and_edit(server, fake, make_page):
    page = make_page(server.url)
    online(page)
    send(page, "hello first")
    wait_idle(page)
    expect(replies(page).last).to_have_text("Echo: hello first")
    before = len(upstream_requests(fake, "hello first"))

    page.locator("article.msg.assistant").last.hover()
    page.get_by_role("button", name="Regenerate this reply").click()
    wait_idle(page)
    assert len(upstream_requests(fake, "hello first")) == before + 1
    expect(page.locator("article.msg")).to_have_count(2)
    expect(replies(page).last).to_have_text("Echo: hello first")

    send(page, "second question")
    wait_idle(page)
    expect(page.locator("article.msg")).to_have_count(4)

    # edit the first message: everything after it is replaced
    first = page.locator("article.msg.user").first
    first.hover()
    first.get_by_role("button", name="Edit and resend").click()
    box = page.locator(".edit-input")
    box.fill("hello edited")
    page.get_by_role("button", name="Save & send").click()
    wait_idle(page)
    expect(page.locator("article.msg")).to_have_count(2)
    expect(replies(page).last).to_have_text("Echo: hello edited")
    c = conv(page)
    status, data = server.session(c["session"])
    assert [(h["role"], h["content"]) for h in data["history"]] == [
        ("user", "hello edited"), ("assistant", "Echo: hello edited")]
    # the upstream saw only the edited message, not the replaced turns
    req = upstream_requests(fake, "hello edited")[-1]
    assert [m["content"] for m in req["messages"] if m["role"] == "user"] == ["hello edited"]
    page.errors.check()


def test_keyboard_and_copy(server, make_page):
    page = make_page(server.url, permissions=["clipboard-read", "clipboard-write"])
    online(page)
    box = page.locator("#input")
    box.fill("line one")
    box.press("Shift+Enter")  # a new line, not a send
    box.type("line two")
    expect(box).to_have_value("line one\nline two")
    expect(page.locator("article.msg")).to_have_count(0)
    box.press("Enter")
    wait_idle(page)
    expect(page.locator("article.msg.user .user-text")).to_have_text("line one\nline two")
    expect(box).to_have_value("")
    send(page, "code sample")
    wait_idle(page)
    copy = page.locator(".code-block .code-copy")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()").startswith("def merge(a: list[int]")
    page.locator("article.msg.assistant").last.get_by_role("button", name="Copy message").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("Here is a quick comparison")
    page.errors.check()


def test_model_switch_and_unavailable_models(server, fake, make_page):
    page = make_page(server.url)
    online(page)
    select = page.locator("select#model")
    expect(select).to_have_value("fake/fake-model")
    offline = select.locator("option[value='offline/offline-model']")
    assert offline.is_disabled()
    assert "NEXLM_TEST_UNSET_KEY" in offline.inner_text()
    select.select_option("fake/fake-reasoner")
    send(page, "which model")
    wait_idle(page)
    req = upstream_requests(fake, "which model")[-1]
    assert req["model"] == "fake-reasoner"
    expect(page.locator("article.msg.assistant .model-tag").last).to_have_text("fake/fake-reasoner")
    page.errors.check()


def test_settings_reach_the_upstream(server, fake, make_page):
    page = make_page(server.url)
    online(page)
    page.get_by_role("button", name="Settings").click()
    dialog = page.locator("dialog#settings")
    expect(dialog).to_be_visible()
    dialog.get_by_label("System prompt").fill("Be terse.")
    dialog.get_by_label("Temperature").fill("0.3")
    dialog.get_by_label("Top P").fill("0.5")
    dialog.get_by_label("Max tokens").fill("77")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#param-chips")).to_contain_text("temp 0.3")
    send(page, "with settings")
    wait_idle(page)
    req = upstream_requests(fake, "with settings")[-1]
    assert req["temperature"] == pytest.approx(0.3)
    assert req["top_p"] == pytest.approx(0.5)
    assert req["max_tokens"] == 77
    assert req["messages"][0] == {"role": "system", "content": "Be terse."}
    # the server session holds them too (shown per conversation)
    status, data = server.session(conv(page)["session"])
    assert data["params"]["max_tokens"] == 77
    page.errors.check()


def test_the_cache_switch_reaches_the_session(server, fake, make_page):
    page = make_page(server.url)
    online(page)
    page.get_by_role("button", name="Settings").click()
    dialog = page.locator("dialog#settings")
    switch = dialog.get_by_label("Reuse identical answers (response cache)")
    expect(switch).to_be_checked()
    switch.uncheck()
    dialog.get_by_role("button", name="Save").click()
    expect(page.locator("#param-chips")).to_contain_text("no cache")
    send(page, "without the cache")
    wait_idle(page)
    status, data = server.session(conv(page)["session"])
    assert data["params"]["cache"] is False
    page.get_by_role("button", name="Settings").click()
    expect(switch).not_to_be_checked()  # the dialog shows the conversation's choice
    page.errors.check()


def test_model_output_never_executes(server, make_page):
    page = make_page(server.url)
    external = []
    page.on("request", lambda r: external.append(r.url) if ":1/" in r.url or "leak" in r.url else None)
    online(page)
    send(page, "xss please")
    wait_idle(page)
    body = replies(page).last
    expect(body).to_contain_text("<img src=x onerror=")  # shown as text
    expect(body).to_contain_text("<script>")
    assert page.evaluate("window.__xss") is None
    thread = page.locator("#thread")
    assert thread.locator("script, iframe, svg.x, img[onerror], [onload]").count() == 0
    assert thread.locator("img").count() == 0  # the external image became a link, not a load
    assert thread.locator("a[href^='javascript']").count() == 0
    for a in thread.locator(".msg-body a[href]").all():
        assert a.get_attribute("target") == "_blank"
        assert a.get_attribute("rel") == "noopener noreferrer"
    assert external == []
    page.errors.check()


def test_error_shown_inline(server, make_page):
    page = make_page(server.url)
    online(page)
    send(page, "fail now")
    wait_idle(page)
    err = page.locator("article.msg.assistant .msg-error")
    expect(err).to_be_visible()
    # the provider's label and status, never the upstream's own words (docs/protocol.md)
    expect(err).to_contain_text("fake answered 500")
    expect(err).not_to_contain_text("fake upstream was told to fail")
    expect(page.locator("article.msg.assistant .badge")).to_have_text("Failed")
    page.errors.check()


def test_export_markdown_and_json(server, make_page):
    page = make_page(server.url)
    online(page)
    send(page, "export me")
    wait_idle(page)
    page.get_by_role("button", name="Export", exact=True).click()
    with page.expect_download() as dl:
        page.get_by_role("menuitem", name="Export as Markdown").click()
    md = open(dl.value.path(), encoding="utf-8").read()
    assert "export me" in md and "Echo: export me" in md and dl.value.suggested_filename.endswith(".md")
    page.get_by_role("button", name="Export", exact=True).click()
    with page.expect_download() as dl:
        page.get_by_role("menuitem", name="Export as JSON").click()
    import json
    data = json.loads(open(dl.value.path(), encoding="utf-8").read())
    assert [m["content"] for m in data["messages"]] == ["export me", "Echo: export me"]
    page.errors.check()


# ------------------------------------------------------------------------------- persistence


def test_reload_restores_the_conversation(server, make_page):
    page = make_page(server.url)
    online(page)
    send(page, "remember one")
    wait_idle(page)
    send(page, "remember two")
    wait_idle(page)
    before = conv(page)
    page.reload()
    online(page)
    expect(page.locator("article.msg")).to_have_count(4)
    expect(replies(page).last).to_have_text("Echo: remember two")
    after = conv(page)
    assert after["session"] == before["session"]  # reattached to the same server session
    expect(page.locator(".conv-item.active .conv-name")).to_have_text("remember one")
    # a new chat, then back to the first from the sidebar
    page.get_by_role("button", name="New chat").first.click()
    expect(page.locator("article.msg")).to_have_count(0)
    send(page, "other chat")
    wait_idle(page)
    expect(page.locator(".conv-item")).to_have_count(2)
    other_session = conv(page)["session"]
    page.locator(".conv-item .conv-open", has_text="remember one").click()
    online(page)
    expect(page.locator("article.msg")).to_have_count(4)
    # delete the other one: two clicks (the first only arms the button)
    item = page.locator(".conv-item", has_text="other chat")
    item.hover()
    item.get_by_role("button", name="Delete conversation").click()
    expect(page.locator(".conv-item")).to_have_count(2)
    item.get_by_role("button", name="Delete?").click()
    expect(page.locator(".conv-item")).to_have_count(1)
    page.wait_for_function(f"() => fetch('api/sessions/{other_session}').then(r => r.status === 404)")
    page.reload()
    online(page)
    expect(page.locator(".conv-item")).to_have_count(1)
    page.errors.check()


def test_two_tabs_on_one_conversation(server, make_page):
    page = make_page(server.url)
    online(page)
    send(page, "tab one")
    wait_idle(page)
    other = page.context.new_page()
    other.goto(server.url)
    online(other)
    expect(other.locator("article.msg")).to_have_count(2)
    send(page, "tab one again")
    # the other tab sees the reply stream in, then the turn that started it
    expect(other.locator("article.msg.assistant .msg-body").last).to_have_text("Echo: tab one again")
    expect(other.locator("article.msg")).to_have_count(4)
    expect(other.locator("article.msg.user .user-text").last).to_have_text("tab one again")
    wait_idle(page)
    page.errors.check()


def test_resume_after_a_drop_mid_reply(server, make_page):
    page = make_page(server.url)
    online(page)
    send(page, "slow resume me")
    expect(replies(page).last).to_contain_text("word6")
    # The socket dies under us (as when the network drops); the page reconnects with ?after=.
    # From then on every event arrives twice, as from a server that replays too much: the page
    # must apply each one once (by its seq).
    page.evaluate("""() => {
        const c = window.nexlm.state.conn;
        const real = c.hooks.onFrame;
        c.hooks.onFrame = (f, via) => { real(f, via); if (f.type !== 'session') real({...f}, via); };
        c.drop();
        c.scheduleReconnect();
    }""")
    expect(page.locator("#conn")).to_have_attribute("data-state", "offline")
    online(page)
    expect(replies(page).last).to_contain_text("word30")
    page.locator("#stop").click()
    wait_idle(page)
    c = conv(page)
    status, data = server.session(c["session"])
    last = data["history"][-1]
    assert c["messages"][-1]["content"] == last["content"]  # no gap, no duplicate
    words = last["content"].split()
    assert words == [f"word{i}" for i in range(1, len(words) + 1)]
    page.errors.check()


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_reload_mid_reply_resumes_it(server, make_page, transport):
    page = make_page(server.url)
    online(page)
    if transport == "sse":
        page.evaluate("() => localStorage.setItem('nexlm.pref.transport', JSON.stringify('sse'))")
        page.reload()
        online(page)
        expect(page.locator("#conn-text")).to_contain_text("SSE")
    send(page, "slow reload me")
    expect(replies(page).last).to_contain_text("word6")
    page.reload()  # the reply goes on on the server (resume grace); the page picks it up again
    online(page)
    expect(page.locator("article.msg.assistant.streaming")).to_have_count(1)
    expect(replies(page).last).to_contain_text("word20")
    page.locator("#stop").click()
    wait_idle(page)
    c = conv(page)
    status, data = server.session(c["session"])
    last = data["history"][-1]
    assert last["finish_reason"] == "stopped"
    assert c["messages"][-1]["content"] == last["content"]
    words = last["content"].split()
    assert words == [f"word{i}" for i in range(1, len(words) + 1)]
    expect(page.locator("article.msg")).to_have_count(2)
    page.errors.check()


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_server_restart_reconnects_and_restores_context(own_server, fake, make_page, transport):
    page = make_page(own_server.url)
    page.evaluate(f"() => localStorage.setItem('nexlm.pref.transport', JSON.stringify('{transport}'))")
    page.reload()
    online(page)
    before, down = f"before restart {transport}", f"while down {transport}"
    send(page, before)
    wait_idle(page)
    old = conv(page)["session"]
    own_server.kill()
    if transport == "ws":  # SSE has no open connection: it notices at the next request
        expect(page.locator("#conn")).to_have_attribute("data-state", "offline")
    # typed while the server is down: queued, then sent once when it is back
    send(page, down)
    expect(page.locator("#conn")).to_have_attribute("data-state", "offline")
    expect(page.locator("article.msg.user.pending .badge")).to_have_text("Queued")
    own_server.start()
    online(page, timeout=30000)
    wait_idle(page)
    expect(replies(page).last).to_have_text(f"Echo: {down}")
    c = conv(page)
    assert c["session"] != old
    reqs = upstream_requests(fake, down)
    assert len(reqs) == 1  # never twice
    # the new session was re-seeded from the browser's copy: the old turn is in the context
    assert [m["content"] for m in reqs[0]["messages"]] == [before, f"Echo: {before}", down]
    status, data = own_server.session(c["session"])
    assert [h["content"] for h in data["history"] if h["role"] == "user"] == [before, down]
    page.errors.check()


# ------------------------------------------------------------------------------- SSE, embed


def test_sse_mode(server, fake, make_page):
    page = make_page(server.url)
    online(page)
    page.get_by_role("button", name="Settings").click()
    page.locator("dialog#settings").get_by_label("Connection").select_option("sse")
    page.locator("dialog#settings").get_by_role("button", name="Save").click()
    expect(page.locator("#conn-text")).to_contain_text("SSE")
    send(page, "over sse")
    wait_idle(page)
    expect(replies(page).last).to_have_text("Echo: over sse")
    send(page, "second over sse")
    wait_idle(page)
    req = upstream_requests(fake, "second over sse")[-1]
    assert [m["content"] for m in req["messages"]] == ["over sse", "Echo: over sse", "second over sse"]
    # stop works over HTTP
    send(page, "slow sse stop")
    expect(replies(page).last).to_contain_text("word5")
    page.locator("#stop").click()
    wait_idle(page)
    expect(page.locator("article.msg.assistant .badge").last).to_have_text("Stopped")
    # regenerate in SSE mode
    page.locator("article.msg.assistant").last.hover()
    page.get_by_role("button", name="Regenerate this reply").click()
    expect(page.locator("article.msg.assistant.streaming")).to_have_count(1)
    page.locator("#stop").click()
    wait_idle(page)
    expect(page.locator("article.msg")).to_have_count(6)
    page.errors.check()


def test_sse_edit_and_regenerate_stay_in_the_session(server, fake, make_page):
    """Over SSE, regenerate and edit are POST /sse's own types on the same session: nothing is
    seeded anew, and the upstream sees the same context as over the WebSocket."""
    page = make_page(server.url)
    page.evaluate("() => localStorage.setItem('nexlm.pref.transport', JSON.stringify('sse'))")
    page.reload()
    online(page)
    expect(page.locator("#conn-text")).to_contain_text("SSE")
    send(page, "sse first")
    wait_idle(page)
    send(page, "sse second")
    wait_idle(page)
    session = conv(page)["session"]
    before = len(upstream_requests(fake, "sse second"))
    page.locator("article.msg.assistant").last.hover()
    page.get_by_role("button", name="Regenerate this reply").click()
    wait_idle(page)
    regenerated = upstream_requests(fake, "sse second")
    assert len(regenerated) == before + 1
    assert [m["content"] for m in regenerated[-1]["messages"]] == ["sse first", "Echo: sse first", "sse second"]
    expect(page.locator("article.msg")).to_have_count(4)

    first = page.locator("article.msg.user").first
    first.hover()
    first.get_by_role("button", name="Edit and resend").click()
    page.locator(".edit-input").fill("sse edited")
    page.get_by_role("button", name="Save & send").click()
    wait_idle(page)
    expect(page.locator("article.msg")).to_have_count(2)
    expect(replies(page).last).to_have_text("Echo: sse edited")
    assert conv(page)["session"] == session
    status, data = server.session(session)
    assert [(h["role"], h["content"]) for h in data["history"]] == [
        ("user", "sse edited"), ("assistant", "Echo: sse edited")]
    req = upstream_requests(fake, "sse edited")[-1]
    assert [m["content"] for m in req["messages"] if m["role"] == "user"] == ["sse edited"]
    page.errors.check()


def test_embed_mode_in_a_cross_origin_iframe(server, parent_site, make_page):
    parent_site.target = server.url + "?embed=1"
    page = make_page(parent_site.origin + "/")
    frame = page.frame_locator("iframe#chat")
    expect(frame.locator("#conn")).to_have_attribute("data-state", "online")
    expect(frame.locator("#sidebar")).to_be_hidden()
    frame.locator("#input").fill("from the portal")
    frame.locator("#input").press("Enter")
    expect(frame.locator("article.msg.assistant .msg-body")).to_have_text("Echo: from the portal")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "embed-iframe.png"), animations="disabled")
    page.errors.check()


# ------------------------------------------------------------------------------- looks


def test_i18n_switch_and_screenshots(server, make_page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = make_page(server.url, color_scheme="light", locale="en-US")
    online(page)
    expect(page.locator("#new-chat")).to_contain_text("New chat")
    page.screenshot(path=str(SCREENSHOTS / "empty-light.png"), animations="disabled")
    send(page, "code compare Python and Rust, merge two sorted lists, and solve x^2-5x+6=0")
    wait_idle(page)
    expect(page.locator(".thinking-label")).to_contain_text(re.compile(r"Thought for [\d.]+ s"))
    expect(page.locator(".code-block .code-lang")).to_have_text("python")
    expect(page.locator(".code-block .hljs-keyword").first).to_be_visible()
    expect(page.locator(".msg-meta").last).to_contain_text("tokens")
    expect(page.locator(".msg-meta").last).to_contain_text("tok/s")
    page.locator(".thinking-summary").click()
    page.locator("#scroller").evaluate("el => el.scrollTop = 0")
    page.screenshot(path=str(SCREENSHOTS / "reply-code-reasoning-light.png"), animations="disabled")

    page.locator("#theme-toggle").click()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    page.screenshot(path=str(SCREENSHOTS / "reply-code-reasoning-dark.png"), animations="disabled")

    page.locator("#lang-toggle").click()
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    expect(page.locator("#new-chat")).to_contain_text("新建对话")
    expect(page.locator("#input")).to_have_attribute("placeholder", "输入消息…")
    page.screenshot(path=str(SCREENSHOTS / "zh-dark.png"), animations="disabled")

    phone = make_page(server.url, viewport={"width": 375, "height": 740}, color_scheme="dark", locale="zh-CN",
                      device_scale_factor=2)
    online(phone)
    expect(phone.locator("#new-chat")).to_contain_text("新建对话")  # follows the browser language
    expect(phone.locator("#sidebar")).not_to_be_in_viewport()
    send(phone, "code on a phone")
    wait_idle(phone)
    phone.screenshot(path=str(SCREENSHOTS / "phone-zh-dark.png"), animations="disabled")
    page.errors.check()
    phone.errors.check()


def test_chinese_is_drawn_with_real_glyphs(server, make_page):
    """Without a CJK font (README: fonts-noto-cjk) every Chinese character is the same empty box."""
    page = make_page(server.url, locale="zh-CN")
    online(page)
    expect(page.locator("#new-chat")).to_contain_text("新建对话")
    drawn = page.evaluate("""() => {
      const family = getComputedStyle(document.querySelector('#new-chat')).fontFamily;
      const c = document.createElement('canvas');
      c.width = c.height = 64;
      const g = c.getContext('2d');
      g.font = '48px ' + family;
      const draw = (ch) => {
        g.clearRect(0, 0, 64, 64);
        g.fillText(ch, 4, 52);
        return Array.from(g.getImageData(0, 0, 64, 64).data).join(',');
      };
      return [draw('中'), draw('文'), draw(String.fromCodePoint(0x10FFFD))];
    }""")
    zhong, wen, missing = drawn
    assert zhong != wen, "'中' and '文' are drawn alike: no CJK font, boxes only"
    assert missing not in (zhong, wen)
    page.errors.check()


def test_works_under_a_path_prefix(tmp_path, fake, parent_site, make_page):
    s = Server(tmp_path, fake.port, parent_site.origin, base_path="/web")
    s.start()
    try:
        page = make_page(s.url)
        online(page)
        expect(page.locator("select#model")).to_have_value("fake/fake-model")
        send(page, "under a prefix")
        wait_idle(page)
        expect(replies(page).last).to_have_text("Echo: under a prefix")
        page.evaluate("() => localStorage.setItem('nexlm.pref.transport', JSON.stringify('sse'))")
        page.reload()
        online(page)
        send(page, "sse under a prefix")
        wait_idle(page)
        expect(replies(page).last).to_have_text("Echo: sse under a prefix")
        page.errors.check()
    finally:
        s.stop()


@pytest.mark.slow
def test_a_reply_waiting_for_the_embedded_model_shows_its_place(tmp_path, fake, parent_site, make_page):
    """The embedded model answers one reply at a time: the one behind says so, then streams."""
    s = Server(tmp_path, fake.port, parent_site.origin, local=True)
    s.start()
    try:
        first = make_page(s.url)
        online(first)
        first.locator("select#model").select_option("local/smollm2-135m-instruct")
        send(first, "Write a very long story about a lighthouse keeper and the sea.")
        expect(replies(first).last).not_to_have_text("", timeout=120000)  # it holds the model now
        second = make_page(s.url)
        online(second)
        second.locator("select#model").select_option("local/smollm2-135m-instruct")
        send(second, "Hello!")
        waiting = second.locator("article.msg.assistant .msg-body.queued")
        expect(waiting).to_have_attribute("data-waiting", "Waiting for the model (1 ahead)…")
        first.locator("#stop").click()
        wait_idle(second, timeout=120000)
        expect(second.locator("article.msg.assistant .msg-body.queued")).to_have_count(0)
        expect(replies(second).last).not_to_have_text("")
        first.errors.check()
        second.errors.check()
    finally:
        s.stop()


def test_login_page_when_tokens_are_configured(tmp_path, fake, parent_site, make_page):
    s = Server(tmp_path, fake.port, parent_site.origin, extra='\n[auth]\ntokens = ["s3cret-token"]\n')
    s.start()
    try:
        status, _ = http_json(s.url + "api/models")
        assert status == 401
        page = make_page(s.url)
        expect(page).to_have_url(re.compile(r"/login$"))
        page.get_by_label("Access token").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#login-error")).to_be_visible()
        page.get_by_label("Access token").fill("s3cret-token")
        page.get_by_role("button", name="Sign in").click()
        online(page)
        send(page, "after login")
        wait_idle(page)
        expect(replies(page).last).to_have_text("Echo: after login")
        page.errors.check()
    finally:
        s.stop()


def test_login_page_says_when_attempts_are_throttled(tmp_path, fake, parent_site, make_page):
    s = Server(tmp_path, fake.port, parent_site.origin, extra='\n[auth]\ntokens = ["s3cret-token-0123456789"]\n')
    s.start()
    try:
        page = make_page(s.url)
        expect(page).to_have_url(re.compile(r"/login$"))
        for i in range(12):
            page.get_by_label("Access token").fill(f"wrong-{i}")
            with page.expect_navigation():
                page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#login-error")).to_have_text("Too many failed attempts: wait a few seconds and try again.")
        page.errors.check()
    finally:
        s.stop()
