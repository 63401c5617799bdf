"""The context window: what of a conversation is sent upstream with the next question."""

from __future__ import annotations

from .config import ChatConfig
from .providers.base import Params
from .records import Conversation


def context(conv: Conversation, chat: ChatConfig) -> list[dict]:
    """System prompt, then the last ``max_history_turns`` complete turns, then the question.

    ``history`` ends with the user message being answered. A turn whose reply
    has no text (failed or stopped before the first token) is left out with
    its question, so roles still alternate; so is one still ``streaming`` (it
    is a reply being written, not context).
    """
    *earlier, question = conv.history
    turns: list[tuple[dict, dict]] = []
    pending: dict | None = None
    for entry in earlier:
        if entry["role"] == "user":
            pending = entry
        elif pending is not None:
            if entry["content"] and entry.get("finish_reason") != "streaming":  # (a reply still running elsewhere)
                turns.append((pending, entry))
            pending = None
    keep = chat.max_history_turns
    turns = turns[-keep:] if keep > 0 else []
    messages = []
    system = conv.params.get("system", chat.system_prompt)
    if system:
        messages.append({"role": "system", "content": system})
    for user, assistant in turns:
        messages.append({"role": "user", "content": user["content"]})
        messages.append({"role": "assistant", "content": assistant["content"]})
    messages.append({"role": "user", "content": question["content"]})
    return messages


def params(conv: Conversation) -> Params:
    p = conv.params
    return Params(p.get("temperature"), p.get("top_p"), p.get("max_tokens"))
