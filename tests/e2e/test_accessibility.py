"""An automated accessibility audit of the chat page: axe-core's WCAG 2.0/2.1 A and AA rules
on the empty page and after a streamed reply (reasoning, a table, highlighted code, math), in
both themes and both languages. Every rule runs; the page must have no violations.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NEXLM_CHROMIUM", "/usr/bin/chromium")
# Missing pieces fail the run rather than skip it: a green suite must mean the page was tested.
assert os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK), \
    f"{CHROMIUM} not found: apt-get install chromium (or set NEXLM_CHROMIUM)"

from playwright.sync_api import expect  # noqa: E402

from e2e_support import browser, fake, make_page, parent_site, server  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.e2e

AXE = Path(__file__).resolve().parent / "vendor" / "axe-core" / "axe.min.js"
WCAG = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
IDLE = "() => window.nexlm && !window.nexlm.state.streaming && !window.nexlm.state.pending"


def violations(page) -> list[str]:
    """axe-core's violations of the WCAG A/AA rules, one readable line per element."""
    if not page.evaluate("() => Boolean(window.axe)"):
        page.add_script_tag(path=str(AXE))  # the context bypasses the page's CSP for this
    found = page.evaluate("""(tags) => axe.run(document, {
        runOnly: {type: 'tag', values: tags}, resultTypes: ['violations'],
    }).then(r => r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
        nodes: v.nodes.map(n => n.target.join(' ') + ': ' + n.failureSummary.replace(/\\s+/g, ' '))})))""", WCAG)
    return [f"{v['id']} ({v['impact']}): {v['help']}\n    {node}" for v in found for node in v["nodes"]]


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("theme", ["light", "dark"])
def test_no_wcag_violations(server, make_page, theme, lang):
    page = make_page(server.url, bypass_csp=True, color_scheme=theme, locale="zh-CN" if lang == "zh" else "en-US",
                     reduced_motion="reduce")
    expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=15000)
    expect(page.locator("html")).to_have_attribute("data-theme", theme)
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN" if lang == "zh" else "en")
    empty = violations(page)
    assert not empty, f"the empty page ({theme}, {lang}):\n" + "\n".join(empty)

    page.locator("#input").fill("code compare Python and Rust in a table, with math")
    page.locator("#input").press("Enter")
    page.wait_for_function(IDLE, timeout=20000)
    expect(page.locator(".code-block .hljs-keyword").first).to_be_visible()
    expect(page.locator(".msg-body .math .katex").first).to_be_visible()
    page.locator(".thinking-summary").click()  # the reasoning is read too
    expect(page.locator(".thinking-body")).to_be_visible()
    page.locator("article.msg.assistant").last.hover()  # its actions shown
    reply = violations(page)
    assert not reply, f"after a streamed reply ({theme}, {lang}):\n" + "\n".join(reply)
    page.errors.check()


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_no_wcag_violations_in_other_states(server, make_page, theme):
    """The rest of what a user meets: an inline error, the export menu, editing a message, the
    settings dialog, the phone layout with its sidebar open, and the embedded page."""
    found = []

    def audit(page, what):
        found.extend(f"{what}: {v}" for v in violations(page))

    def ready(page):
        expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=15000)
        return page

    page = ready(make_page(server.url, bypass_csp=True, color_scheme=theme, reduced_motion="reduce"))
    page.locator("#input").fill("fail now")
    page.locator("#input").press("Enter")
    page.wait_for_function(IDLE, timeout=20000)
    expect(page.locator(".msg-error")).to_be_visible()
    audit(page, "an error")
    page.get_by_role("button", name="Export", exact=True).click()
    audit(page, "the export menu")
    page.keyboard.press("Escape")
    first = page.locator("article.msg.user").first
    first.hover()
    first.get_by_role("button", name="Edit and resend").click()
    audit(page, "editing")
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Settings").click()
    # The user's usage, loaded when the dialog opens (auth is off: the one user); this module's
    # server has answered at least the reply above this month.
    month = page.locator("#usage-panel table").first.get_by_role("row", name="This month")
    expect(month).to_be_visible()
    expect(month.locator("td").first).to_have_text(re.compile(r"^[1-9][\d,]*$"))
    audit(page, "the settings dialog")
    page.keyboard.press("Escape")

    phone = ready(make_page(server.url, bypass_csp=True, color_scheme=theme, viewport={"width": 375, "height": 740}))
    phone.locator("#open-sidebar").click()
    audit(phone, "the phone sidebar")
    audit(ready(make_page(server.url + "?embed=1", bypass_csp=True, color_scheme=theme)), "embedded")
    assert not found, f"{theme}:\n" + "\n".join(found)
    page.errors.check()
