"""Quotas, the parts without a server: the config, which rule applies, the UTC periods and their
resets, and the counters of every backend (memory, sqlite, redis) behaving the same."""

from __future__ import annotations

import calendar
import secrets

import pytest
from redis_servers import command

from nexlm.config import ConfigError, QuotaRule, QuotasConfig, load_settings
from nexlm.quota_counters import MemoryCounters, Spent, SQLiteCounters
from nexlm.quotas import Effective, Quotas, effective, periods
from nexlm.validation import ChatError

BASE = ('[providers.fake]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "k"\n'
        'models = ["fake-model", "fake-reasoner"]\n')


def load(tmp_path, text: str):
    path = tmp_path / "nexlm.toml"
    path.write_text(BASE + text)
    return load_settings(str(path), env={})


def utc(*args) -> float:
    return float(calendar.timegm((*args, 0, 0, 0)[:6]))


# ------------------------------------------------------------ config

def test_quota_tables_are_loaded_with_unset_keys_left_to_less_specific_rules(tmp_path):
    s = load(tmp_path, '[quotas.default]\ntokens_per_day = 200000\nmessages_per_day = 500\nmodels = ["fake/*"]\n'
                       '[quotas.group.staff]\ntokens_per_month = 5000000\n'
                       '[quotas.user.alice]\ntokens_per_day = 0\n')
    q = s.quotas
    assert q.default == QuotaRule(tokens_per_day=200000, messages_per_day=500, models=("fake/*",))
    assert q.groups == {"staff": QuotaRule(tokens_per_month=5000000)}
    assert q.users == {"alice": QuotaRule(tokens_per_day=0)}
    assert q.enabled and not load(tmp_path, "").quotas.enabled


@pytest.mark.parametrize("text, where", [
    ('[quotas.default]\ntokens_per_day = -1\n', r"\[quotas.default\] tokens_per_day: expected a whole number"),
    ('[quotas.default]\ntokens_per_day = "lots"\n', r"tokens_per_day: expected a whole number"),
    ('[quotas.default]\nmessages_per_day = true\n', r"messages_per_day: expected a whole number"),
    ('[quotas.group.staff]\ntokens_per_week = 5\n', r"\[quotas.group.staff\] tokens_per_week: unknown key"),
    ('[quotas.user.bob]\nmodels = "fake/*"\n', r"\[quotas.user.bob\] models: expected a list"),
    ('[quotas.default]\nmodels = ["fkae/*"]\n', r"'fkae/\*' matches no configured model \(known: .*fake/fake-model"),
    ('[quotas.team.x]\ntokens_per_day = 1\n', r"\[quotas.team\]: unknown table"),
    ('[quotas]\ngroup = 3\n', r"\[quotas.group\]: expected tables"),
])
def test_bad_quota_config_stops_the_start(tmp_path, text, where):
    with pytest.raises(ConfigError, match=where):
        load(tmp_path, text)


# ------------------------------------------------------------ which rule applies

CFG = QuotasConfig(
    default=QuotaRule(tokens_per_day=1000, messages_per_day=10, models=("fake/fake-model",)),
    groups={"staff": QuotaRule(messages_per_day=20, tokens_per_month=50000),
            "vip": QuotaRule(messages_per_day=30, models=("fake/*",)),
            "free": QuotaRule(messages_per_day=0)},
    users={"alice": QuotaRule(messages_per_day=5, tokens_per_day=0)},
)


def test_the_user_rule_beats_the_group_which_beats_the_default_key_by_key():
    assert effective(CFG, "nobody") == Effective(tokens_per_day=1000, messages_per_day=10, models=("fake/fake-model",))
    # staff: its own messages and monthly tokens, the default's daily tokens and models
    assert effective(CFG, "bob", ("staff",)) == Effective(tokens_per_day=1000, tokens_per_month=50000,
                                                          messages_per_day=20, models=("fake/fake-model",))
    # alice's own keys win over her group's and the default's; the rest is inherited
    assert effective(CFG, "alice", ("staff",)) == Effective(tokens_per_day=0, tokens_per_month=50000,
                                                            messages_per_day=5, models=("fake/fake-model",))


def test_several_groups_give_the_most_generous_value():
    assert effective(CFG, "c", ("staff", "vip")).messages_per_day == 30
    assert effective(CFG, "c", ("staff", "vip")).models == ("fake/*",)
    assert effective(CFG, "c", ("staff", "free")).messages_per_day == 0  # unlimited beats any number
    assert effective(CFG, "c", ("unknown-group",)) == effective(CFG, "c")


def test_model_globs_allow_and_forbid():
    rule = effective(CFG, "x")
    assert rule.allows("fake/fake-model") and not rule.allows("fake/fake-reasoner")
    assert effective(CFG, "x", ("vip",)).allows("fake/fake-reasoner")
    assert Effective().allows("anything/at-all")


# ------------------------------------------------------------ periods

def test_periods_are_utc_days_and_months_with_their_ends():
    p = periods(utc(2026, 12, 31, 23, 59, 59))
    assert (p.day, p.month) == ("2026-12-31", "2026-12")
    assert p.day_ends == utc(2027, 1, 1) and p.month_ends == utc(2027, 1, 1)
    p = periods(utc(2026, 2, 10, 8))
    assert (p.day, p.month, p.day_ends, p.month_ends) == ("2026-02-10", "2026-02", utc(2026, 2, 11), utc(2026, 3, 1))


# ------------------------------------------------------------ counters, every backend

@pytest.fixture(params=["memory", "sqlite", "redis"])
async def counters(request, tmp_path):
    if request.param == "memory":
        c = MemoryCounters()
    elif request.param == "sqlite":
        c = SQLiteCounters(str(tmp_path / "nexlm.db"))
    else:
        from nexlm.quota_counters_redis import RedisCounters

        c = RedisCounters(request.getfixturevalue("redis_server").url)
    await c.open()
    yield c
    await c.close()


async def test_counters_add_per_owner_day_and_month(counters):
    owner = "alice-" + secrets.token_hex(4)
    d1, d2 = periods(utc(2026, 12, 1, 10)), periods(utc(2026, 12, 2, 10))
    assert await counters.read(owner, d1) == Spent(0, 0, 0, 0)
    await counters.add(owner, d1, 100, 1)
    await counters.add(owner, d1, 50, 1)
    await counters.add("other-" + owner, d1, 7, 1)
    assert await counters.read(owner, d1) == Spent(150, 2, 150, 2)
    await counters.add(owner, d2, 10, 1)  # the next day: a new day's count, the same month's
    assert await counters.read(owner, d2) == Spent(10, 1, 160, 3)
    nxt = periods(utc(2027, 1, 1, 0))
    assert await counters.read(owner, nxt) == Spent(0, 0, 0, 0)


async def test_sqlite_counters_survive_a_reopen_and_keep_their_own_schema(tmp_path):
    import sqlite3

    path = str(tmp_path / "nexlm.db")
    p = periods(utc(2026, 12, 1, 10))
    c = SQLiteCounters(path)
    await c.open()
    await c.add("alice", p, 42, 1)
    await c.close()
    c = SQLiteCounters(path)
    await c.open()
    assert await c.read("alice", p) == Spent(42, 1, 42, 1)
    await c.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM quota_schema").fetchall() == [(1,)]
    db.execute("UPDATE quota_schema SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="schema 99, newer"):
        await SQLiteCounters(path).open()


async def test_redis_counter_keys_share_the_owners_slot_and_expire_after_their_period(redis_server):
    from nexlm.quota_counters_redis import GRACE_SECONDS, RedisCounters

    c = RedisCounters(redis_server.url)
    await c.open()
    try:
        p = periods(utc(2030, 5, 7, 12))
        kd, km = c.keys("u:alice", p)
        assert kd[kd.index("{"):kd.index("}")] == km[km.index("{"):km.index("}")]
        await c.add("u:alice", p, 9, 1)
        assert command(redis_server.port, "EXPIRETIME", kd).strip() == f":{int(p.day_ends) + GRACE_SECONDS}"
        assert command(redis_server.port, "EXPIRETIME", km).strip() == f":{int(p.month_ends) + GRACE_SECONDS}"
    finally:
        await c.close()


# ------------------------------------------------------------ the check, with a clock

class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_messages_per_day_refuse_until_the_next_utc_midnight():
    clock = Clock(utc(2026, 12, 2, 22))  # 2 h before midnight
    q = Quotas(QuotasConfig(default=QuotaRule(messages_per_day=2)), clock=clock)
    for _ in range(2):
        await q.check("bob", (), "fake/fake-model")
        q.record("bob", 10)
    with pytest.raises(ChatError) as refused:
        await q.check("bob", (), "fake/fake-model")
    e = refused.value
    assert (e.code, e.status) == ("quota_exceeded", 429)
    assert "2 messages per day" in e.message and "2026-12-03T00:00:00Z" in e.message
    assert e.retry_after == 7200
    await q.check("alice", (), "fake/fake-model")  # another owner's count is their own
    clock.t = utc(2026, 12, 3, 0, 0, 1)
    await q.check("bob", (), "fake/fake-model")


async def test_tokens_per_month_refuse_until_the_first_of_next_month():
    clock = Clock(utc(2026, 12, 30, 12))
    q = Quotas(QuotasConfig(default=QuotaRule(tokens_per_month=100, tokens_per_day=1000)), clock=clock)
    q.record("bob", 60)
    await q.check("bob", (), "m/x")
    q.record("bob", 40)
    clock.t = utc(2026, 12, 31, 12)  # a new day does not reset a month
    with pytest.raises(ChatError) as refused:
        await q.check("bob", (), "m/x")
    assert "100 tokens per month" in refused.value.message and "2027-01-01T00:00:00Z" in refused.value.message
    assert refused.value.retry_after == 12 * 3600
    clock.t = utc(2027, 1, 1, 0, 0, 1)
    await q.check("bob", (), "m/x")


async def test_over_a_day_and_a_month_the_later_reset_is_named():
    clock = Clock(utc(2026, 12, 10, 12))
    q = Quotas(QuotasConfig(default=QuotaRule(messages_per_day=1, messages_per_month=1)), clock=clock)
    q.record("bob", 1)
    with pytest.raises(ChatError) as refused:
        await q.check("bob", (), "m/x")
    assert "2027-01-01T00:00:00Z" in refused.value.message


async def test_no_identity_and_forbidden_models():
    q = Quotas(QuotasConfig(default=QuotaRule(messages_per_day=1, models=("fake/fake-model",))))
    q.record(None, 1000)
    await q.check(None, (), "other/model")  # auth off: nothing applies
    with pytest.raises(ChatError) as refused:
        await q.check("bob", (), "fake/fake-reasoner")
    assert (refused.value.code, refused.value.status) == ("forbidden_model", 403)
    assert "fake/fake-reasoner" in refused.value.message


async def test_redis_gone_at_the_check_is_a_503_and_a_lost_count_is_logged_not_raised(tmp_path, caplog):
    from redis_servers import RedisServer

    from nexlm.quota_counters_redis import RedisCounters

    server = RedisServer(tmp_path / "redis")
    counters = RedisCounters(server.url)
    await counters.open()
    q = Quotas(QuotasConfig(default=QuotaRule(messages_per_day=5)), counters)
    try:
        await q.check("bob", (), "m/x")
        server.stop()
        with pytest.raises(ChatError) as refused:
            await q.check("bob", (), "m/x")
        assert (refused.value.code, refused.value.status) == ("store_unavailable", 503)
        q.record("bob", 10)
        await q.settle()
        assert "could not count 10 tokens" in caplog.text
    finally:
        server.stop()
        await counters.close()


async def test_the_turn_observer_counts_usage_estimates_and_skips_silent_failures():
    from types import SimpleNamespace

    from nexlm.clients import Who
    from nexlm.providers.base import ChatRequest

    clock = Clock(utc(2026, 12, 2, 12))
    q = Quotas(QuotasConfig(default=QuotaRule(tokens_per_day=10 ** 6)), clock=clock)
    bob = Who("bob", (), "127.0.0.1")

    def turn(**kw):
        base = dict(who=bob, usage=None, finish="stop", first_token=1.0, cached=False, chars_out=0,
                    request=ChatRequest("m", [{"role": "user", "content": "12345678"}, {"role": "assistant",
                                                                                        "content": None}]))
        return SimpleNamespace(**{**base, **kw})

    q.turn_done(turn(usage={"prompt_tokens": 30, "completion_tokens": 12}))  # 42, the provider's
    q.turn_done(turn(chars_out=8))  # no usage: (8 sent + 8 streamed) / 4 = 4
    q.turn_done(turn(finish="error", first_token=None))  # failed before saying anything: nothing
    q.turn_done(turn(cached=True, chars_out=400))  # a cache hit: a message, no upstream tokens
    q.turn_done(turn(who=Who(None, (), "127.0.0.1"), chars_out=400))  # no identity: not counted
    spent = await q.counters.read("bob", periods(clock()))
    assert (spent.tokens_day, spent.messages_day) == (46, 3)
