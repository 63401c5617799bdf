"""The page through a real nginx (round robin, the README's config) in front of two NexLM
processes sharing one redis-server: send, stop, reload mid-reply and resume, whichever
instance each request lands on (issue 13). One test, on the fixtures of e2e_support."""

from __future__ import annotations

import pytest
from cluster import Nginx
from e2e_support import Server, browser, fake, http_json, make_page, parent_site  # noqa: F401  (fixtures by name)
from playwright.sync_api import expect
from redis_servers import RedisServer
from test_page import conv, online, replies, send, wait_idle

pytestmark = pytest.mark.e2e


@pytest.fixture
def behind_nginx(tmp_path, fake, parent_site):  # noqa: F811
    redis = RedisServer(tmp_path / "redis")
    servers = []
    nginx = None
    try:
        for _ in range(2):
            s = Server(tmp_path, fake.port, parent_site.origin, extra=f'\n[store]\nkind = "redis"\nurl = "{redis.url}"\n')
            s.start()
            servers.append(s)
        nginx = Nginx(tmp_path / "nginx", [s.port for s in servers])
        yield nginx, servers
    finally:
        if nginx is not None:
            nginx.stop()
        for s in servers:
            s.stop()
        redis.stop()


def test_send_stop_reload_resume_through_nginx(behind_nginx, make_page):  # noqa: F811
    nginx, servers = behind_nginx
    page = make_page(nginx.url + "/")
    online(page)
    send(page, "hello nginx")
    wait_idle(page)
    expect(replies(page).last).to_contain_text("Echo: hello nginx")
    send(page, "slow reload me")
    expect(replies(page).last).to_contain_text("word6")
    page.reload()  # a new connection, to whichever instance nginx picks: the reply is followed there
    online(page)
    expect(page.locator("article.msg.assistant.streaming")).to_have_count(1)
    expect(replies(page).last).to_contain_text("word20")
    page.locator("#stop").click()
    wait_idle(page)
    c = conv(page)
    for s in servers:  # every instance has the same stored turn: exactly what the page shows
        status, data = http_json(f"{s.url}api/sessions/{c['session']}")
        assert status == 200
        last = data["history"][-1]
        assert last["finish_reason"] == "stopped" and last["content"] == c["messages"][-1]["content"]
    words = last["content"].split()
    assert words == [f"word{i}" for i in range(1, len(words) + 1)]
    expect(page.locator("article.msg")).to_have_count(4)
    page.errors.check()
