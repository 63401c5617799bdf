"""A real OpenAI-compatible server as the upstream: llama-cpp-python's own `python -m
llama_cpp.server`, serving the packaged SmolLM2 135M, in a separate process.

Every other upstream in the tests is one we wrote; this one is not. At temperature 0 its
answers are greedy, hence reproducible: what NexLM relays must be exactly what the server
itself answers to the same messages with the same parameters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
from invariants import free_port
from redis_servers import stop_process

from nexlm.config import load_settings
from nexlm.providers.gguf import packaged_model_path
from nexlm.server import create_app

pytestmark = pytest.mark.slow

MODEL = "smol"  # the server's --model_alias: the id it lists and answers as
PARAMS = {"temperature": 0, "max_tokens": 24}
QUESTION = "What is the capital of France?"
READY_SECONDS = 60.0


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1, its output in ``log``."""

    def __init__(self, log_path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_model_path()),
                 "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                 "--n_ctx", "1024", "--n_threads", "1", "--verbose", "false"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = READY_SECONDS) -> None:
        """Poll ``GET /v1/models`` until it lists the model; fail at once if the server exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    ids = [m["id"] for m in json.load(r)["data"]]
                if MODEL in ids:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama_cpp.server not ready after {timeout:.0f} s: {self.output()}")
            time.sleep(0.1)  # a poll interval, not a wait for readiness: the loop checks

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def close(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    server = LlamaServer(tmp_path_factory.mktemp("llama-server") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def own_answer(server: LlamaServer, messages: list[dict], stream: bool, **params) -> dict:
    """The server's own answer, asked directly: ``{"text", "finish_reason", "usage"}``."""
    body = {"model": MODEL, "messages": messages, "stream": stream, **params}
    req = urllib.request.Request(f"{server.base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read().decode()
    if not stream:
        obj = json.loads(raw)
        choice = obj["choices"][0]
        return {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                "usage": obj.get("usage")}
    text, finish, usage = [], None, None
    for line in raw.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        usage = obj.get("usage") or usage
        for choice in obj["choices"]:
            text.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    return {"text": "".join(text), "finish_reason": finish, "usage": usage}


@pytest.fixture(scope="module")
def reference(llama_server) -> dict:
    """The server's answer to QUESTION at temperature 0, the same streamed and not."""
    messages = [{"role": "user", "content": QUESTION}]
    plain = own_answer(llama_server, messages, stream=False, **PARAMS)
    streamed = own_answer(llama_server, messages, stream=True, **PARAMS)
    assert plain["text"] and plain["text"] == streamed["text"], (plain, streamed)
    assert plain["finish_reason"] == streamed["finish_reason"] == "length", (plain, streamed)
    # llama-cpp-python 0.3.36 counts tokens in plain answers only: its streams carry no usage (it
    # ignores stream_options), and NexLM always streams from its upstream
    assert plain["usage"]["completion_tokens"] == PARAMS["max_tokens"] and streamed["usage"] is None
    return plain | {"stream_usage": streamed["usage"]}


@pytest.fixture
async def nexlm(aiohttp_client, tmp_path, llama_server):
    """NexLM with the server as an ``openai``-kind provider (and nothing that loads a model here)."""
    cfg = tmp_path / "nexlm.toml"
    cfg.write_text(f"""
[chat]
default_model = "llama/{MODEL}"
resume_grace_seconds = 0
[providers.llama]
kind = "openai"
base_url = "{llama_server.base_url}"
models = ["{MODEL}"]
max_retries = 0
""")
    return await aiohttp_client(create_app(load_settings(str(cfg), env={})))


async def ws_turn(ws, message: str, **frame) -> tuple[str, dict]:
    """One chat turn on /ws: (the deltas' text, the done frame)."""
    await ws.send_json({"type": "chat", "message": message, **frame})
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(await ws.receive_json(timeout=60))
    assert frames[-1]["type"] == "done", frames[-1]
    return "".join(f["content"] for f in frames if f["type"] == "delta"), frames[-1]


async def test_ws_reply_is_the_servers_own_answer(nexlm, reference):
    ws = await nexlm.ws_connect("/ws")
    assert (await ws.receive_json(timeout=10))["type"] == "session"
    text, done = await ws_turn(ws, QUESTION, model=f"llama/{MODEL}", params=PARAMS)
    await ws.close()
    assert text == reference["text"]
    assert done["finish_reason"] == "length"
    assert done["model"] == f"llama/{MODEL}"


async def test_ws_second_turn_sends_the_conversation_as_the_server_expects(nexlm, llama_server):
    """System prompt, first turn and follow-up, as NexLM builds them: the server answers NexLM what it
    answers the same three messages sent directly."""
    system = "You are a geography teacher. Answer briefly."
    follow_up = "And of Germany?"
    ws = await nexlm.ws_connect("/ws")
    assert (await ws.receive_json(timeout=10))["type"] == "session"
    texts = [(await ws_turn(ws, message, params={**PARAMS, "system": system}))[0] for message in (QUESTION, follow_up)]
    await ws.close()
    first = own_answer(llama_server, [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
                       stream=False, **PARAMS)
    second = own_answer(llama_server, [{"role": "system", "content": system}, {"role": "user", "content": QUESTION},
                                       {"role": "assistant", "content": first["text"]},
                                       {"role": "user", "content": follow_up}], stream=False, **PARAMS)
    assert texts == [first["text"], second["text"]]
    assert second["text"] != first["text"]  # the follow-up was answered, not the first question again


@pytest.fixture
async def sdk(nexlm):
    """The official ``openai`` package, pointed at NexLM's /v1 (no retries: one answer per call)."""
    client = openai.AsyncOpenAI(base_url=str(nexlm.make_url("/v1")), api_key="sk-unused", max_retries=0,
                                timeout=60, http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
    yield client
    await client.close()


async def test_v1_answer_is_the_servers_own(sdk, reference):
    resp = await sdk.chat.completions.create(model=f"llama/{MODEL}", messages=[{"role": "user", "content": QUESTION}],
                                             **PARAMS)
    assert resp.object == "chat.completion"
    [choice] = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == reference["text"]
    assert choice.finish_reason == reference["finish_reason"] == "length"
    assert resp.model == f"llama/{MODEL}"
    assert resp.usage == reference["stream_usage"]  # relayed as NexLM got it (None from this server), not made up


async def test_v1_stream_is_the_servers_own(sdk, reference):
    stream = await sdk.chat.completions.create(model=f"llama/{MODEL}", messages=[{"role": "user", "content": QUESTION}],
                                               stream=True, stream_options={"include_usage": True}, **PARAMS)
    text, finishes, usage_chunks = [], [], []
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usage_chunks.append(chunk.usage)
            continue
        text.append(chunk.choices[0].delta.content or "")
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert "".join(text) == reference["text"]
    assert finishes == [reference["finish_reason"]]
    assert usage_chunks == [reference["stream_usage"]]  # one last chunk, choices [], the usage as relayed
