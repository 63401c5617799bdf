"""``GET /metrics``: Prometheus metrics, from ``prometheus_client``, on a registry of the app's own.

Counters and histograms are observed once per turn, when it ends (``Turn.on_done``),
never per token; gauges are read from what the app already tracks when Prometheus
scrapes. Every label comes from a bounded set: front doors, configured model ids,
provider names, known finish reasons and error codes, anything else ``"other"``; never
an id, a user or any text. The registry is per app (not the library's global one), so
many apps in one process (the tests) do not share counts.

Histogram buckets are OpenTelemetry's GenAI ones (``gen_ai.server.time_to_first_token``,
``gen_ai.client.operation.duration``), time to first token extended to 80 s for CPU models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from . import replylog
from .config import Settings
from .engine import DOORS as _DOORS
from .engine import Turn

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format every Prometheus-compatible scraper reads
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

OTHER = "other"
DOORS = frozenset(_DOORS)  # ws, sse, v1, seed
FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "error", "stopped", "interrupted"})
ERROR_CODES = frozenset({"upstream_error", "rate_limited", "upstream_timeout", "provider_unavailable"})
TRANSPORTS = ("ws", "sse")


def _known(value, allowed) -> str:
    return value if value in allowed else OTHER


def _tokens(usage: dict | None, key: str) -> int | None:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class Metrics:
    """The app's metrics. ``turn_done`` is the turns' observer (it also writes the reply log
    line); ``read_live`` is set once the app's parts exist, for the scrape-time gauges."""

    content_type = CONTENT_TYPE

    def __init__(self, settings: Settings) -> None:
        self.models = frozenset(f"{name}/{m}" for name, p in settings.providers.items() for m in p.models)
        self.providers = frozenset(settings.providers)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nexlm_requests", "Turns by front door and the model asked for, counted when "
                                "they end", ("door", "model"), registry=r)
        self.replies = Counter("nexlm_replies", "Ended replies by front door, answering model and finish reason",
                               ("door", "model", "finish_reason"), registry=r)
        self.ttft = Histogram("nexlm_time_to_first_token_seconds", "From accepting the message to its first token",
                              ("model",), buckets=TTFT_BUCKETS, registry=r)
        self.duration = Histogram("nexlm_reply_duration_seconds", "From accepting the message to the reply's end",
                                  ("model",), buckets=DURATION_BUCKETS, registry=r)
        self.added = Histogram("nexlm_added_latency_seconds", "Time to first token minus the upstream's own (its "
                               "request sent to its first token read): what NexLM adds", ("model",),
                               buckets=ADDED_BUCKETS, registry=r)
        self.input_tokens = Counter("nexlm_input_tokens", "Prompt tokens as the upstream reported them",
                                    ("model",), registry=r)
        self.output_tokens = Counter("nexlm_output_tokens", "Completion tokens as the upstream reported them",
                                     ("model",), registry=r)
        self.upstream_errors = Counter("nexlm_upstream_errors", "Failures a provider gave up on (after its own "
                                       "retries), fallbacks' included", ("provider", "code"), registry=r)
        self.cache_hits = Counter("nexlm_cache_hits", "Response cache lookups answered from the cache",
                                  registry=r)
        self.cache_misses = Counter("nexlm_cache_misses", "Response cache lookups that found nothing",
                                    registry=r)
        self.cache_bytes = Counter("nexlm_cache_stored_bytes", "Bytes written into the response cache",
                                   registry=r)
        self.loop_lag = Histogram("nexlm_event_loop_lag_seconds", "How late a 10 ms sleep wakes up",
                                  buckets=LAG_BUCKETS, registry=r)
        self.read_live: Callable[[], dict] = dict
        r.register(_LiveGauges(self))

    def turn_done(self, turn: Turn, session: str | None = None) -> None:
        """A turn ended (its ``on_done``): count it, and write its log line."""
        door = _known(turn.door, DOORS)
        model = _known(turn.model, self.models)
        self.requests.labels(door, _known(turn.resolved.id, self.models)).inc()
        self.replies.labels(door, model, _known(turn.finish, FINISH_REASONS)).inc()
        ended = turn.ended if turn.ended is not None else time.monotonic()
        self.duration.labels(model).observe(ended - turn.started)
        if turn.first_token is not None:
            ttft = turn.first_token - turn.started
            self.ttft.labels(model).observe(ttft)
            up = turn.upstream
            if up.sent is not None and up.first_token is not None:
                self.added.labels(model).observe(max(0.0, ttft - (up.first_token - up.sent)))
        tokens_in, tokens_out = _tokens(turn.usage, "prompt_tokens"), _tokens(turn.usage, "completion_tokens")
        cached = getattr(turn, "cached", False)  # replayed from the response cache: the upstream spent nothing
        if tokens_in and not cached:
            self.input_tokens.labels(model).inc(tokens_in)
        if tokens_out and not cached:
            self.output_tokens.labels(model).inc(tokens_out)
        for provider, code in turn.failures:
            self.upstream_errors.labels(_known(provider, self.providers), _known(code, ERROR_CODES)).inc()
        replylog.reply(turn, session, tokens_in, tokens_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveGauges(Collector):
    """Gauges read at scrape time from what the app tracks anyway (no bookkeeping of their own)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        live = self.metrics.read_live()
        connections = GaugeMetricFamily("nexlm_active_connections", "Open /ws and /sse streams",
                                        labels=("transport",))
        for transport in TRANSPORTS:
            connections.add_metric((transport,), live.get("connections", {}).get(transport, 0))
        yield connections
        yield GaugeMetricFamily("nexlm_active_replies", "Replies holding a reply slot, queued ones included",
                                value=live.get("active_replies", 0))
        yield GaugeMetricFamily("nexlm_queued_replies", "Replies waiting for a single-slot model",
                                value=live.get("queued_replies", 0))
        yield GaugeMetricFamily("nexlm_sessions", "Stored sessions", value=live.get("sessions", 0))
