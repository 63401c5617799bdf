"""SSEDecoder: the incremental event-stream parser, fed the byte-exact wire samples whole,
split at every byte boundary, one byte at a time, and with every kind of line ending."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexlm.providers.sse import SSEDecoder, SSEEvent

FIXTURES = Path(__file__).parent / "fixtures"
STREAM_FIXTURES = sorted({p.name for p in FIXTURES.glob("*stream*.txt")} | {"in-stream-error.txt",
                                                                            "openai-usage-then-done.txt"})

# (number of events, number of comments) in each sample, counted by hand from the files.
EXPECTED_COUNTS = {
    "deepseek-reasoner-stream.txt": (7, 2),
    "in-stream-error.txt": (2, 0),
    "llamacpp-server-stream-with-headers.txt": (11, 0),
    "llamacpp-server-stream.txt": (23, 0),
    "ollama-openai-reasoning-stream.txt": (6, 0),
    "openai-usage-then-done.txt": (5, 0),
    "openai-tool-calls-stream.txt": (11, 0),
}


def body(name: str) -> bytes:
    """The event stream of a sample, without its HTTP head if it has one."""
    raw = (FIXTURES / name).read_bytes()
    if raw.startswith(b"HTTP/"):
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"{name}: no blank line after the HTTP head"
    return raw


def decode(*chunks: bytes) -> tuple[list[SSEEvent], SSEDecoder]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for c in chunks:
        events += decoder.feed(c)
    return events, decoder


def oracle(raw: bytes) -> list[SSEEvent]:
    """An obviously correct reading of an LF-only sample whose events are single ``data: `` lines."""
    out = []
    for block in raw.decode("utf-8").split("\n\n"):
        data = [line[len("data: "):] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            out.append(SSEEvent("\n".join(data)))
    return out


def test_every_sample_is_covered():
    assert set(STREAM_FIXTURES) == set(EXPECTED_COUNTS)


@pytest.mark.parametrize("name", STREAM_FIXTURES)
def test_sample_whole(name):
    raw = body(name)
    events, decoder = decode(raw)
    n_events, n_comments = EXPECTED_COUNTS[name]
    assert len(events) == n_events
    assert decoder.comments == n_comments
    assert events == oracle(raw)
    assert all(e.event == "message" and e.id is None for e in events)
    assert not decoder.pending
    if name != "in-stream-error.txt":  # the one sample cut before [DONE]
        assert events[-1] == SSEEvent("[DONE]")


@pytest.mark.parametrize("name", STREAM_FIXTURES)
def test_sample_split_at_every_byte_boundary(name):
    raw = body(name)
    whole, whole_decoder = decode(raw)
    for i in range(len(raw) + 1):
        events, decoder = decode(raw[:i], raw[i:])
        assert events == whole, f"split at byte {i}"
        assert decoder.comments == whole_decoder.comments, f"split at byte {i}"
        assert not decoder.pending, f"split at byte {i}"


@pytest.mark.parametrize("name", STREAM_FIXTURES)
def test_sample_one_byte_at_a_time(name):
    raw = body(name)
    whole, whole_decoder = decode(raw)
    events, decoder = decode(*(raw[i:i + 1] for i in range(len(raw))))
    assert events == whole
    assert decoder.comments == whole_decoder.comments
    assert not decoder.pending


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
@pytest.mark.parametrize("name", ["deepseek-reasoner-stream.txt", "ollama-openai-reasoning-stream.txt"])
def test_sample_with_other_line_endings_split_everywhere(name, newline):
    lf = body(name)
    raw = lf.replace(b"\n", newline)
    expected, lf_decoder = decode(lf)
    for i in range(len(raw) + 1):
        events, decoder = decode(raw[:i], raw[i:])
        assert events == expected, f"split at byte {i}"
        assert decoder.comments == lf_decoder.comments, f"split at byte {i}"


def test_multibyte_utf8_split_mid_character():
    raw = body("deepseek-reasoner-stream.txt")
    whole, _ = decode(raw)
    assert '"reasoning_content":"用户问"' in whole[1].data
    start = raw.index("用".encode())
    for cut in (start + 1, start + 2):  # inside the three bytes of 用
        events, _ = decode(raw[:cut], raw[cut:])
        assert events == whole
        assert "\ufffd" not in "".join(e.data for e in events)


def test_utf8_character_fed_byte_by_byte():
    raw = "data: 你好\n\n".encode()
    events, _ = decode(*(raw[i:i + 1] for i in range(len(raw))))
    assert events == [SSEEvent("你好")]


def test_crlf():
    events, decoder = decode(b"data: a\r\n\r\ndata: b\r\n\r\n")
    assert events == [SSEEvent("a"), SSEEvent("b")]
    assert not decoder.pending


def test_lone_cr():
    events, decoder = decode(b"data: a\r\rdata: b\rdata: c\r\rdata: d")
    assert events == [SSEEvent("a"), SSEEvent("b\nc")]
    assert decoder.pending


def test_event_ended_by_lone_cr_is_dispatched_without_waiting_for_more_input():
    # "\r\r" is a complete line and a blank line (WHATWG: CR alone ends a line). The last
    # event of a CR-only stream must come out before EOF, not wait for a byte that never comes.
    events, decoder = decode(b"data: a\r\r")
    assert events == [SSEEvent("a")]
    assert not decoder.pending


def test_cr_at_chunk_end_then_lf_is_one_line_end():
    # If "\r" + "\n" across two reads counted as two line ends, the empty line between them
    # would dispatch "a" on its own.
    events, decoder = decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert events == [SSEEvent("a\nb")]
    assert not decoder.pending


def test_cr_at_chunk_end_then_another_line_is_a_line_end():
    events, _ = decode(b"data: a\r", b"data: b\r", b"\r", b"data: c")
    assert events == [SSEEvent("a\nb")]


def test_mixed_line_endings():
    events, _ = decode(b"data: a\r\ndata: b\ndata: c\r\r\ndata: d\n\rdata: e")
    assert events == [SSEEvent("a\nb\nc"), SSEEvent("d")]


def test_comments_are_counted_not_returned():
    events, decoder = decode(b": keep-alive\n\n: keep-alive\n\ndata: x\n\n")
    assert events == [SSEEvent("x")]
    assert decoder.comments == 2


def test_comment_inside_an_event_does_not_end_it():
    events, decoder = decode(b"data: a\n: ping\ndata: b\n\n")
    assert events == [SSEEvent("a\nb")]
    assert decoder.comments == 1


def test_comment_split_across_reads_counts_once():
    events, decoder = decode(b": keep", b"-alive\n", b"\n")
    assert events == []
    assert decoder.comments == 1
    assert not decoder.pending


def test_multiline_data_joined_with_newline():
    events, _ = decode(b"data: a\ndata: b\ndata:c\ndata:  d\n\n")
    # Only one space after the colon is stripped.
    assert events == [SSEEvent("a\nb\nc\n d")]


def test_data_field_without_colon_or_value():
    events, _ = decode(b"data\n\ndata:\n\n")
    assert events == [SSEEvent(""), SSEEvent("")]


def test_event_and_id_fields():
    events, _ = decode(b"event: ping\nid: 42\ndata: x\n\ndata: y\n\n")
    # The event type is per event; the last event id persists (WHATWG).
    assert events == [SSEEvent("x", "ping", "42"), SSEEvent("y", "message", "42")]


def test_id_with_nul_is_ignored_and_unknown_fields_are_skipped():
    events, _ = decode(b"id: 1\ndata: a\n\nid: 2\x003\nretry: 100\nfoo: bar\ndata: b\n\n")
    assert events == [SSEEvent("a", "message", "1"), SSEEvent("b", "message", "1")]


def test_event_without_data_is_not_dispatched():
    events, _ = decode(b"event: ping\n\ndata: x\n\n")
    assert events == [SSEEvent("x")]


def test_unterminated_event_is_not_emitted_and_pending():
    events, decoder = decode(b"data: x\n")
    assert events == []
    assert decoder.pending
    assert decoder.feed(b"\n") == [SSEEvent("x")]
    assert not decoder.pending


def test_partial_line_is_pending():
    events, decoder = decode(b"data: {\"choi")
    assert events == []
    assert decoder.pending


def test_empty_feed():
    events, decoder = decode(b"", b"")
    assert events == []
    assert not decoder.pending
