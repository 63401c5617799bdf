"""A Responses API request (``POST /v1/responses``) checked and turned into a chat request.

NexLM relays every model through chat completions, so a Responses request becomes
chat messages, the three generation parameters NexLM itself knows (temperature,
top_p, max_tokens) and ``extra``: the OpenAI parameters passed through to
OpenAI-compatible upstreams (tools, tool_choice, parallel_tool_calls, user,
response_format). Nothing is stored, so anything that needs a stored response
is refused with a 400 that says so, and so is every field this module does not
know: a silently ignored parameter is a silent wrong answer.

``store``: OpenAI's default is true, but a client that omits it has asked for
nothing to be kept, so omitted (or null) means false here; only an explicit
``true`` is refused. Codex CLI sends ``store: false``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...validation import ChatError, check_params, clean_text

if TYPE_CHECKING:
    from ...config import LimitsConfig

# Used and checked below.
USED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "max_output_tokens", "temperature", "top_p",
    "stream", "store", "previous_response_id", "parallel_tool_calls", "user", "text", "background",
    "conversation", "prompt",
})
# Accepted and ignored: hints clients send (Codex CLI, the SDK) that change nothing a stateless relay
# could honour. ``reasoning`` (effort/summary) and ``include`` (e.g. "reasoning.encrypted_content")
# are requests for more than chat completions can give; ``truncation`` "auto"/"disabled" and
# ``stream_options`` (obfuscation) do not change the answer; the rest are bookkeeping.
IGNORED = frozenset({
    "metadata", "include", "reasoning", "truncation", "stream_options", "prompt_cache_key",
    "safety_identifier", "service_tier", "top_logprobs", "max_tool_calls", "prompt_cache_retention",
})
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text")


class InvalidRequest(ChatError):
    """A refused field; ``param`` names it, as OpenAI's error envelope does."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__("bad_request", message, status, param=param)


@dataclass(slots=True)
class ResponsesRequest:
    """What the gateway needs (``model``, ``messages``, ``params``, ``extra``) plus what the
    response object echoes back (``echo``: instructions, tools, tool_choice, ... as sent)."""

    model: str
    messages: list[dict]
    params: dict
    extra: dict
    stream: bool
    echo: dict = field(default_factory=dict)


def parse_request(body, limits: LimitsConfig) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(str(k)[:40] for k in body if k not in USED and k not in IGNORED)
    if unknown:
        raise InvalidRequest(f"Unsupported parameter(s): {', '.join(unknown)}. This server relays the "
                             "Responses API statelessly over chat completions.", unknown[0])
    _refuse_stateful(body)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model is required (a model id or alias, as GET /v1/models lists them)", "model")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise InvalidRequest("stream must be a boolean", "stream")

    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("instructions must be a string", "instructions")
        if instructions.strip():
            messages.append({"role": "system", "content": clean_text(instructions)})
    messages += input_messages(body.get("input"))
    if not any(m["role"] != "system" for m in messages):
        raise InvalidRequest("input is empty: send a string or at least one user message", "input")

    params = _params(body, limits)
    extra: dict = {}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be an array", "tools")
        if tools:
            extra["tools"] = [_tool(i, t) for i, t in enumerate(tools)]
    if body.get("tool_choice") is not None:
        extra["tool_choice"] = _tool_choice(body["tool_choice"])
    ptc = body.get("parallel_tool_calls")
    if ptc is not None:
        if not isinstance(ptc, bool):
            raise InvalidRequest("parallel_tool_calls must be a boolean", "parallel_tool_calls")
        extra["parallel_tool_calls"] = ptc
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise InvalidRequest("user must be a string", "user")
        extra["user"] = user[:256]
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        extra["response_format"] = fmt

    echo = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tools": tools or [],
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": True if ptc is None else ptc,
        "user": user,
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "text": body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}},
    }
    return ResponsesRequest(model.strip(), messages, params, extra, bool(stream), echo)


def _refuse_stateful(body: dict) -> None:
    if body.get("previous_response_id") is not None:
        raise InvalidRequest("previous_response_id is not supported: this server does not store responses "
                             "yet. Send the whole conversation in input (with store: false).",
                             "previous_response_id")
    if body.get("store") not in (None, False):
        raise InvalidRequest("store: true is not supported: this server does not store responses yet. "
                             "Send store: false (or leave it out) and the whole conversation in input.", "store")
    if body.get("background") not in (None, False):
        raise InvalidRequest("background: true is not supported: it needs stored responses.", "background")
    if body.get("conversation") is not None:
        raise InvalidRequest("conversation is not supported: this server does not store conversations yet.",
                             "conversation")
    if body.get("prompt") is not None:
        raise InvalidRequest("prompt (a stored prompt template) is not supported; send instructions and input.",
                             "prompt")


def _params(body: dict, limits: LimitsConfig) -> dict:
    """temperature, top_p and max_output_tokens (as max_tokens), with the limits every door has."""
    raw = {k: body[k] for k in ("temperature", "top_p") if body.get(k) is not None}
    if body.get("max_output_tokens") is not None:
        raw["max_tokens"] = body["max_output_tokens"]
    try:
        return check_params(limits, raw)
    except ChatError as exc:
        param = next((k for k in raw if exc.message.startswith(k)), None)
        if param == "max_tokens":
            raise InvalidRequest(exc.message.replace("max_tokens", "max_output_tokens"),
                                 "max_output_tokens") from None
        raise InvalidRequest(exc.message, param) from None


def input_messages(value) -> list[dict]:
    """``input`` (a string, or a list of items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": clean_text(value)}]
    if not isinstance(value, list):
        raise InvalidRequest("input must be a string or an array of input items", "input")
    out: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where),
                                 "arguments": _string(item, "arguments", where, empty=True)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # one assistant turn: its text and its calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": _output_text(item.get("output"), where)})
        elif kind == "reasoning":
            continue  # a reasoning item from an earlier reply (Codex sends them back): chat has no slot for it
        elif kind == "item_reference":
            raise InvalidRequest(f"{where}: item_reference is not supported: this server does not store items.",
                                 where)
        else:
            raise InvalidRequest(f"{where}: input items of type {str(kind)[:40]!r} are not supported "
                                 "(supported: message, function_call, function_call_output, reasoning)", where)
    return out


def _string(item: dict, key: str, where: str, empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise InvalidRequest(f"{where}.{key} must be a{'' if empty else ' non-empty'} string", f"{where}.{key}")
    return clean_text(value)


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of user, system, developer, assistant", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": ROLES[role], "content": clean_text(content)}
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or an array of content parts", f"{where}.content")
    texts: list[str] = []
    parts: list[dict] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{at}.text must be a string", at)
            texts.append(clean_text(text))
            parts.append({"type": "text", "text": texts[-1]})
        elif kind == "input_image" and role == "user":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise InvalidRequest(f"{at}: only input_image with an image_url (a URL or data: URL) is supported",
                                     at)
            image = {"url": url}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise InvalidRequest(f"{at}: content parts of type {str(kind)[:40]!r} are not supported here "
                                 "(supported: input_text, output_text, and input_image with image_url)", at)
    if len(parts) == len(texts):  # text only: a plain string, which every upstream understands
        return {"role": ROLES[role], "content": "\n".join(texts)}
    return {"role": ROLES[role], "content": parts}


def _output_text(output, where: str) -> str:
    """A function_call_output's output: a string, or text parts joined."""
    if isinstance(output, str):
        return clean_text(output)
    if isinstance(output, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS
                                        and isinstance(p.get("text"), str) for p in output):
        return clean_text("\n".join(p["text"] for p in output))
    raise InvalidRequest(f"{where}.output must be a string or an array of input_text parts", f"{where}.output")


def _tool(i: int, tool) -> dict:
    """A Responses function tool (flat) as a chat completions tool (nested under ``function``)."""
    where = f"tools[{i}]"
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise InvalidRequest(f"{where}: tools of type {str(kind)[:40]!r} are not supported; only function tools "
                             "are (the model answers through chat completions, which has no built-in tools)", where)
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.name must be a non-empty string", f"{where}.name")
    fn: dict = {"name": name}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            fn[key] = tool[key]
    return {"type": "function", "function": fn}


def _tool_choice(choice):
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}',
                         "tool_choice")


def _text_format(text):
    """``text.format`` as chat's ``response_format``; None for plain text (the default)."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest('text.format must be {"type": "text"}, {"type": "json_object"} or '
                         '{"type": "json_schema", "name", "schema"}', "text.format")
