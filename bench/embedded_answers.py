"""The embedded model's answers to fixed prompts, with time to first token and tokens/s.

    python bench/embedded_answers.py                       # the default model (SmolLM2 135M Instruct)
    python bench/embedded_answers.py --packaged gemma-3-270m   # another packaged model, same prompts

Runs the provider in process (no server), at temperature 0, one prompt at a time, after
loading the model once. Prints a Markdown table and each reply. Timing is for this
machine at the time of the run: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexlm.config import builtin_providers  # noqa: E402
from nexlm.providers.base import ChatRequest, Finish, Params, TextDelta, Usage  # noqa: E402
from nexlm.providers.gguf import PACKAGED  # noqa: E402
from nexlm.providers.llamacpp import LlamaCppProvider  # noqa: E402

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Hello!",
    "Write a Python function that reverses a string.",
    "中国的首都是哪里？",
    "用一句话介绍你自己。",
]


async def run(packaged: str, max_tokens: int) -> None:
    config = builtin_providers({})["local"]
    if packaged:
        config = replace(config, packaged=packaged, models=(packaged,), label=PACKAGED[packaged].label)
    provider = LlamaCppProvider(config)
    t0 = time.monotonic()
    await provider.load()
    print(f"# {config.label}\n\nmodel loaded in {time.monotonic() - t0:.2f} s\n")
    rows, replies = [], []
    try:
        for prompt in PROMPTS:
            req = ChatRequest(config.models[0], [{"role": "user", "content": prompt}],
                              Params(temperature=0, max_tokens=max_tokens))
            start, first, text, usage, finish = time.monotonic(), None, "", {}, None
            async for ev in provider.stream(req):
                if isinstance(ev, TextDelta):
                    first = first or time.monotonic()
                    text += ev.text
                elif isinstance(ev, Usage):
                    usage = ev.data
                elif isinstance(ev, Finish):
                    finish = ev.reason
            end = time.monotonic()
            n = usage.get("completion_tokens", 0)
            tps = (n - 1) / (end - first) if first and n > 1 and end > first else float("nan")
            rows.append(f"| {prompt} | {(first - start) * 1000:.0f} ms | {n} | {tps:.0f} | {finish} |")
            replies.append((prompt, text))
    finally:
        await provider.close()
    print("| prompt | first token | tokens | tokens/s | finish |\n|---|---|---|---|---|")
    print("\n".join(rows))
    for prompt, text in replies:
        print(f"\n**{prompt}**\n\n> " + text.strip().replace("\n", "\n> "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packaged", default="", choices=["", *PACKAGED], help="a packaged model other than the default")
    p.add_argument("--max-tokens", type=int, default=200)
    args = p.parse_args()
    asyncio.run(run(args.packaged, args.max_tokens))


if __name__ == "__main__":
    main()
