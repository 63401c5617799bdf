"""/v1 in front of a real OpenAI-compatible server: llama-cpp-python's own (``python -m
llama_cpp.server``) with the packaged SmolLM2 model. At temperature 0 the text through NexLM,
streamed and not, equals what the server answers directly."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import openai
import pytest
from invariants import free_port

from nexlm.providers.gguf import packaged_model_path

pytestmark = pytest.mark.slow
QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture
async def llama_server():
    """The server in a subprocess on 127.0.0.1; its base URL once it answers."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_model_path()), "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", "1024", "--n_threads", "2", "--verbose", "False",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(90):
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"llama_cpp.server exited: {(await proc.stderr.read()).decode()[-2000:]}")
                try:
                    async with http.get(url + "/models") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.2)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_v1_text_equals_the_servers_own_at_temperature_0(llama_server, make_client):
    client = await make_client(f'[providers.real]\nkind = "openai"\nbase_url = "{llama_server}"\n'
                               'models = ["smollm2"]\nmax_retries = 0\nfirst_token_timeout = 60')
    http = openai.DefaultAsyncHttpxClient(trust_env=False)
    direct = openai.AsyncOpenAI(base_url=llama_server, api_key="none", max_retries=0, http_client=http)
    ours = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="none", max_retries=0, http_client=http)
    try:
        kw = {"messages": QUESTION, "temperature": 0, "max_tokens": 40, "seed": 1}
        theirs = (await direct.chat.completions.create(model="smollm2", **kw)).choices[0].message.content
        assert theirs.strip()
        got = await ours.chat.completions.create(model="real/smollm2", **kw)
        assert got.choices[0].message.content == theirs
        assert got.model == "real/smollm2" and got.choices[0].finish_reason in ("stop", "length")
        stream = await ours.chat.completions.create(model="real", stream=True, **kw)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == theirs
    finally:
        await http.aclose()
