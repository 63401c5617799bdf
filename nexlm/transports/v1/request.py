"""A ``POST /v1/chat/completions`` body, checked: every refusal a 400 that names the field.

Pure functions of the body and the limits. What passes is OpenAI's own shape, cleaned
(no NULs or lone surrogates in text), so an OpenAI-compatible upstream gets what the
client meant; parameters beyond temperature/top_p/max_tokens travel as ``extra``
(``providers.base.EXTRA_KEYS``). ``null`` for an optional parameter means "not given",
as OpenAI reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...validation import ChatError, clean_text

ROLES = ("system", "developer", "user", "assistant", "tool")
PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")
KNOWN = ("model", "messages", "stream", "stream_options", "n", "temperature", "top_p", "max_tokens",
         "max_completion_tokens", "stop", "seed", "presence_penalty", "frequency_penalty", "response_format",
         "tools", "tool_choice", "parallel_tool_calls", "user")
MAX_MESSAGES = 4096
MAX_TOOLS = 128


@dataclass(frozen=True, slots=True)
class ChatCall:
    model: str
    messages: list[dict]
    params: dict = field(default_factory=dict)  # temperature, top_p, max_tokens
    extra: dict = field(default_factory=dict)  # base.EXTRA_KEYS
    stream: bool = False
    include_usage: bool = False


def bad(message: str, param: str | None) -> ChatError:
    return ChatError("bad_request", message, 400, param=param)


def parse_chat(body, max_tokens_cap: int) -> ChatCall:
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", None)
    for key in body:
        if key not in KNOWN:
            raise bad(f"Unrecognized request argument supplied: {str(key)[:60]} (supported: {', '.join(KNOWN)}).",
                      str(key)[:60])
    b = {k: v for k, v in body.items() if v is not None}
    model = b.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required (a model id from GET /v1/models).", "model")
    n = b.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad("n must be a positive integer.", "n")
    if n > 1:
        raise bad("n > 1 is not supported: ask for one choice at a time.", "n")
    stream = b.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false.", "stream")
    include_usage = False
    if "stream_options" in b:
        so = b["stream_options"]
        if not stream:
            raise bad("stream_options is only allowed when stream is true.", "stream_options")
        if not isinstance(so, dict) or any(k not in ("include_usage",) for k in so) \
                or not isinstance(so.get("include_usage", False), bool):
            raise bad('stream_options must be {"include_usage": true|false}.', "stream_options")
        include_usage = so.get("include_usage", False)
    params = {}
    for key, hi in (("temperature", 2.0), ("top_p", 1.0)):
        if key in b:
            params[key] = _number(b[key], key, 0.0, hi)
    extra: dict = {}
    for key in ("max_tokens", "max_completion_tokens"):
        if key in b:
            v = b[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= max_tokens_cap:
                raise bad(f"{key} must be an integer from 1 to {max_tokens_cap}.", key)
            (params if key == "max_tokens" else extra)[key] = v
    for key in ("presence_penalty", "frequency_penalty"):
        if key in b:
            extra[key] = _number(b[key], key, -2.0, 2.0)
    if "seed" in b:
        if isinstance(b["seed"], bool) or not isinstance(b["seed"], int):
            raise bad("seed must be an integer.", "seed")
        extra["seed"] = b["seed"]
    if "stop" in b:
        extra["stop"] = _stop(b["stop"])
    if "user" in b:
        if not isinstance(b["user"], str) or len(b["user"]) > 256:
            raise bad("user must be a string of at most 256 characters.", "user")
        extra["user"] = clean_text(b["user"])
    if "parallel_tool_calls" in b:
        if not isinstance(b["parallel_tool_calls"], bool):
            raise bad("parallel_tool_calls must be true or false.", "parallel_tool_calls")
        extra["parallel_tool_calls"] = b["parallel_tool_calls"]
    if "response_format" in b:
        extra["response_format"] = _response_format(b["response_format"])
    if "tools" in b:
        extra["tools"] = _tools(b["tools"])
    if "tool_choice" in b:
        extra["tool_choice"] = _tool_choice(b["tool_choice"])
    messages = _messages(b.get("messages"))
    return ChatCall(model, messages, params, extra, stream, include_usage)


def _number(v, key: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise bad(f"{key} must be a number from {lo:g} to {hi:g}.", key)
    return float(v)


def _stop(v):
    if isinstance(v, str):
        return clean_text(v)
    if isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) and s for s in v):
        return [clean_text(s) for s in v]
    raise bad("stop must be a string or a list of up to 4 non-empty strings.", "stop")


def _response_format(v) -> dict:
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        raise bad('response_format must be {"type": "text"|"json_object"|"json_schema", ...}.', "response_format")
    if v["type"] == "json_schema" and not isinstance(v.get("json_schema"), dict):
        raise bad("response_format.json_schema must be an object.", "response_format.json_schema")
    return v


def _tools(v) -> list:
    if not isinstance(v, list) or not v or len(v) > MAX_TOOLS:
        raise bad(f"tools must be a list of 1 to {MAX_TOOLS} function tools.", "tools")
    for i, t in enumerate(v):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise bad(f'{p} must be {{"type": "function", "function": {{"name": ...}}}}.', p)
        fn = t["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{p}.function.name must be a non-empty string.", f"{p}.function.name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise bad(f"{p}.function.parameters must be a JSON Schema object.", f"{p}.function.parameters")
        if "description" in fn and not isinstance(fn["description"], str):
            raise bad(f"{p}.function.description must be a string.", f"{p}.function.description")
    return v


def _tool_choice(v):
    if v in ("none", "auto", "required"):
        return v
    if isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict) \
            and isinstance(v["function"].get("name"), str):
        return v
    raise bad('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.',
              "tool_choice")


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad("messages must be a non-empty list of chat messages.", "messages")
    if len(v) > MAX_MESSAGES:
        raise bad(f"messages holds {len(v)} messages; the limit is {MAX_MESSAGES}.", "messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(v)]


def _message(m, p: str) -> dict:
    if not isinstance(m, dict):
        raise bad(f"{p} must be an object with a role and a content.", p)
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"{p}.role must be one of {', '.join(ROLES)}.", f"{p}.role")
    out: dict = {"role": role}
    content = m.get("content")
    calls = m.get("tool_calls") if role == "assistant" else None
    if content is None:
        if not (role == "assistant" and calls):
            raise bad(f"{p}.content is required.", f"{p}.content")
        out["content"] = None
    else:
        out["content"] = _content(content, f"{p}.content")
    if isinstance(m.get("name"), str):
        out["name"] = clean_text(m["name"][:200])
    if calls is not None:
        if not isinstance(calls, list):
            raise bad(f"{p}.tool_calls must be a list.", f"{p}.tool_calls")
        for j, c in enumerate(calls):
            cp = f"{p}.tool_calls[{j}]"
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(c.get("id") if isinstance(c, dict) else None, str) or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
                raise bad(f'{cp} must be {{"id", "type": "function", "function": {{"name", "arguments": string}}}}.',
                          cp)
        out["tool_calls"] = calls
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise bad(f"{p}.tool_call_id is required for a tool message (the id of the call it answers).",
                      f"{p}.tool_call_id")
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _content(c, p: str):
    if isinstance(c, str):
        return clean_text(c)
    if not isinstance(c, list):
        raise bad(f"{p} must be a string or a list of content parts.", p)
    parts = []
    for k, part in enumerate(c):
        pp = f"{p}[{k}]"
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            raise bad(f"{pp} must be a content part with a type ({', '.join(PART_TYPES)}).", pp)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{pp}.text must be a string.", f"{pp}.text")
            part = {**part, "text": clean_text(part["text"])}
        parts.append(part)
    return parts
