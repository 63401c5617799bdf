"""History across devices: ``GET /api/sessions`` lists the caller's conversations (needs an
identity), ``PATCH /api/sessions/{id}`` renames one, ``DELETE`` removes it."""

from __future__ import annotations

import pytest
from conftest import WS
from fake_upstream import Script, chunk

from nexlm.appkeys import CONVERSATIONS

ROLE = chunk("", role=True)
TOKENS = '[auth]\ntokens = ["tok-A-7f3c9e", "tok-B-21d8aa"]'
A = {"Authorization": "Bearer tok-A-7f3c9e"}
B = {"Authorization": "Bearer tok-B-21d8aa"}
KEYS = {"session", "title", "model", "created", "updated", "messages", "running"}


def turns(question: str, answer: str = "ok") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "finish_reason": "stop"}]


@pytest.fixture(params=["memory", "sqlite"])
async def api(make_client, tmp_path, request):
    """The same tests on each store: the list reads ``list_owner`` with live records laid over it."""
    store = "" if request.param == "memory" else f'\n[store]\nkind = "sqlite"\npath = "{tmp_path / "history.db"}"'
    client = await make_client(TOKENS + store)
    assert client.app[CONVERSATIONS].store.kind == request.param
    return client


async def seeded(api, headers, question: str) -> str:
    r = await api.post("/api/sessions", json={"history": turns(question)}, headers=headers)
    assert r.status == 201, await r.text()
    return (await r.json())["session"]


async def listing(api, headers, **query) -> dict:
    r = await api.get("/api/sessions", params={k: str(v) for k, v in query.items()}, headers=headers)
    assert r.status == 200, await r.text()
    return await r.json()


async def test_each_owner_sees_only_their_own_newest_first(api):
    a = [await seeded(api, A, f"question {i} from A") for i in range(3)]
    b = [await seeded(api, B, "question from B")]
    mine = await listing(api, A)
    assert [e["session"] for e in mine["sessions"]] == a[::-1] and mine["next"] is None
    theirs = await listing(api, B)
    assert [e["session"] for e in theirs["sessions"]] == b
    e = mine["sessions"][0]
    assert set(e) == KEYS
    assert e["title"] == "question 2 from A" and e["model"] == "fake/fake-model"
    assert e["messages"] == 2 and e["running"] is False and e["updated"] >= e["created"] > 0
    # Another owner's session does not exist for them: not renamed, not deleted.
    assert (await api.patch(f"/api/sessions/{a[0]}", json={"title": "x"}, headers=B)).status == 404
    assert (await api.delete(f"/api/sessions/{a[0]}", headers=B)).status == 404
    assert len((await listing(api, A))["sessions"]) == 3


async def test_pages_follow_the_cursor_without_gaps_or_repeats(api):
    made = [await seeded(api, A, f"q{i}") for i in range(5)]
    seen, pages, query = [], [], {"limit": 2}
    while True:
        page = await listing(api, A, **query)
        pages.append(len(page["sessions"]))
        seen += [e["session"] for e in page["sessions"]]
        if page["next"] is None:
            break
        assert page["next"] == page["sessions"][-1]["updated"]
        query = {"limit": 2, "before": page["next"]}
    assert pages == [2, 2, 1] and seen == made[::-1]


async def test_a_conversation_that_moves_to_the_top_is_not_listed_again_below(api, upstream):
    """Its stored copy is older than the live record (written back later): the live one counts."""
    made = [await seeded(api, A, f"q{i}") for i in range(4)]
    first = await listing(api, A, limit=2)
    assert [e["session"] for e in first["sessions"]] == [made[3], made[2]]
    ws = WS(await api.ws_connect(f"/ws?session={made[0]}", headers=A))
    assert (await ws.recv())["session"] == made[0]
    await ws.send({"type": "chat", "message": "again"})
    await ws.until("done")
    await ws.close()
    rest = await listing(api, A, limit=2, before=first["next"])
    assert [e["session"] for e in rest["sessions"]] == [made[1]] and rest["next"] is None
    top = (await listing(api, A, limit=1))["sessions"][0]
    assert top["session"] == made[0] and top["messages"] == 4


async def test_rename_answers_the_entry_and_shows_in_the_list(api):
    sid = await seeded(api, A, "what is a monad")
    r = await api.patch(f"/api/sessions/{sid}", json={"title": "  Monads \u2013 notes  "}, headers=A)
    assert r.status == 200
    entry = await r.json()
    assert set(entry) == KEYS and entry["session"] == sid and entry["title"] == "Monads \u2013 notes"
    assert (await listing(api, A))["sessions"][0]["title"] == "Monads \u2013 notes"
    r = await api.patch(f"/api/sessions/{sid}", json={"title": ""}, headers=A)  # unnamed again
    assert (await r.json())["title"] == "what is a monad"
    assert (await api.patch("/api/sessions/nope", json={"title": "x"}, headers=A)).status == 404


@pytest.mark.parametrize("body, words", [
    ({"title": 5}, "must be a string"),
    ({"title": None}, "must be a string"),
    ({"title": "x" * 201}, "too long (201 characters, the limit is 200)"),
    ({"title": "two\nlines"}, "control characters"),
    ({"title": "bell\x07"}, "control characters"),
    ({}, "title"),
    ([], "title"),
])
async def test_rename_refuses_bad_titles(api, body, words):
    sid = await seeded(api, A, "keep me")
    r = await api.patch(f"/api/sessions/{sid}", json=body, headers=A)
    assert r.status == 400
    err = await r.json()
    assert err["code"] == "bad_request" and words in err["message"]
    assert (await listing(api, A))["sessions"][0]["title"] == "keep me"


async def test_rename_refuses_a_body_that_is_not_json(api):
    sid = await seeded(api, A, "keep me")
    r = await api.patch(f"/api/sessions/{sid}", data=b"{title", headers={**A, "Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["code"] == "bad_request"


async def test_a_title_of_200_characters_is_kept_whole(api):
    sid = await seeded(api, A, "q")
    r = await api.patch(f"/api/sessions/{sid}", json={"title": "é" * 200}, headers=A)
    assert r.status == 200 and (await r.json())["title"] == "é" * 200


async def test_delete_removes_it_from_the_list(api):
    keep, gone = await seeded(api, A, "keep"), await seeded(api, A, "gone")
    assert (await api.delete(f"/api/sessions/{gone}", headers=A)).status == 200
    assert [e["session"] for e in (await listing(api, A))["sessions"]] == [keep]


async def test_without_an_identity_the_list_is_refused(make_client):
    api = await make_client()  # auth off: nobody has an identity
    await seeded(api, {}, "anyone's")
    r = await api.get("/api/sessions")
    assert r.status == 403
    err = await r.json()
    assert err["code"] == "no_identity" and "capability" in err["message"]


async def test_with_tokens_on_a_request_without_one_is_401(api):
    r = await api.get("/api/sessions")
    assert r.status == 401 and (await r.json())["code"] == "unauthorized"


@pytest.mark.parametrize("query", [{"limit": "0"}, {"limit": "201"}, {"limit": "ten"}, {"before": "soon"},
                                   {"before": "nan"}, {"before": "inf"}])
async def test_bad_page_queries_are_refused(api, query):
    r = await api.get("/api/sessions", params=query, headers=A)
    assert r.status == 400 and (await r.json())["code"] == "bad_request"


async def test_running_flag_while_a_reply_streams(api, upstream):
    upstream.push(Script([ROLE, chunk("x"), "hang"]))
    ws = WS(await api.ws_connect("/ws", headers=A))
    sid = (await ws.recv())["session"]
    await ws.send({"type": "chat", "message": "a long answer please"})
    await ws.until("delta")
    entry = (await listing(api, A))["sessions"][0]
    assert entry["session"] == sid and entry["running"] is True and entry["title"] == "a long answer please"
    await ws.send({"type": "stop"})
    await ws.until("done")
    assert (await listing(api, A))["sessions"][0]["running"] is False
    await ws.close()


async def test_title_is_the_first_user_message_cut_to_80(api, upstream):
    ws = WS(await api.ws_connect("/ws", headers=A))
    sid = (await ws.recv())["session"]
    question = "Explain,\n  in detail, " + "why " * 40
    await ws.send({"type": "chat", "message": question})
    await ws.until("done")
    await ws.send({"type": "chat", "message": "and then?"})
    await ws.until("done")
    await ws.close()
    entry = (await listing(api, A))["sessions"][0]
    assert entry["session"] == sid and entry["messages"] == 4
    assert entry["title"] == " ".join(question.split())[:80] and len(entry["title"]) == 80
    # Editing the first message changes an unnamed session's title; a given name stays.
    assert (await api.patch(f"/api/sessions/{sid}", json={"title": "Mine"}, headers=A)).status == 200
    assert (await listing(api, A))["sessions"][0]["title"] == "Mine"


async def test_empty_conversations_are_not_listed(api):
    """Every page load opens a session; until something is said in it there is nothing to list."""
    ws = WS(await api.ws_connect("/ws", headers=A))
    await ws.recv()
    r = await api.post("/api/sessions", json={}, headers=A)
    assert r.status == 201
    sid = await seeded(api, A, "said something")
    assert [e["session"] for e in (await listing(api, A))["sessions"]] == [sid]
    await ws.close()


async def test_pages_skip_empty_ones_without_losing_the_rest(api):
    made = [await seeded(api, A, "q0")]
    for _ in range(3):
        assert (await api.post("/api/sessions", json={}, headers=A)).status == 201
    made.append(await seeded(api, A, "q1"))
    first = await listing(api, A, limit=1)
    rest = await listing(api, A, limit=1, before=first["next"])
    assert [e["session"] for e in first["sessions"] + rest["sessions"]] == made[::-1]
