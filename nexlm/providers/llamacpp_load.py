"""Loading a GGUF model with llama-cpp-python, and the prompt its chat template makes.

Blocking code, run off the event loop by the provider (``llamacpp``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import ProviderConfig
from .gguf import (
    DEFAULT_PACKAGED,
    INSTALL_HINT,
    PACKAGED,
    LoadError,
    packaged_model_path,
    selfcheck,
)


def _import_llama_cpp():
    """``llama_cpp``, or ``LoadError`` saying how to install it."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise LoadError(f"llama-cpp-python is not installed ({INSTALL_HINT}): {exc}") from None
    except OSError as exc:  # the shared library is there but does not load
        raise LoadError(f"llama-cpp-python is installed but its library does not load: {exc}") from None

def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True

def _n_threads(configured: int) -> int:
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------ prompt

class _Captured(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("captured")
        self.kwargs = kwargs


class _PromptCapture:
    """Stands in for ``Llama`` in a llama-cpp-python chat handler to get its prompt.

    The library keeps its chat formats (named ones like ``gemma``, and the
    GGUF's own Jinja template) behind completion handlers that tokenize the
    formatted prompt and then call ``create_completion``. Running the handler
    against this object yields the exact prompt tokens and stop strings the
    library would use, without starting its generation, which cannot be
    stopped within one token or report token counts while streaming.
    """

    verbose = False

    def __init__(self, llm: Any):
        self._llm = llm

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._llm.tokenize(text, add_bos=add_bos, special=special)

    def create_completion(self, **kwargs: Any) -> None:
        raise _Captured(kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)


def _fold_system(messages: list[dict]) -> list[dict]:
    """Gemma has no system role (the library's format drops it): prepend it to the first user turn,
    as Gemma's own template does."""
    system = "\n\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if not system:
        return rest
    for m in rest:
        if m.get("role") == "user":
            m["content"] = f"{system}\n\n{m.get('content') or ''}"
            return rest
    return [{"role": "user", "content": system}, *rest]


@dataclass
class _Model:
    llm: Any
    llama_cpp: Any
    handler: Callable[..., Any]
    chat_format: str
    n_ctx: int

    def prompt(self, messages: list[dict]) -> tuple[list[int], list[str]]:
        if self.chat_format == "gemma":
            messages = _fold_system(messages)
        try:
            self.handler(llama=_PromptCapture(self.llm), messages=messages)
        except _Captured as got:
            stop = got.kwargs.get("stop") or []
            return list(got.kwargs["prompt"]), [stop] if isinstance(stop, str) else [s for s in stop if s]
        raise LoadError(f"chat_format {self.chat_format!r} is not supported by the embedded provider")

    def ends_turn(self, token: int) -> bool:
        """End-of-generation tokens, and any other control token (``<start_of_turn>``,
        ``<|im_start|>``...): a base model that starts a new turn has finished its reply."""
        lc = self.llama_cpp
        try:
            vocab = self.llm._model.vocab
            return bool(lc.llama_vocab_is_eog(vocab, token)
                        or lc.llama_vocab_get_attr(vocab, token) & lc.LLAMA_TOKEN_ATTR_CONTROL)
        except AttributeError:  # another llama-cpp-python version
            return token == self.llm.token_eos()


def _chat_format(config: ProviderConfig) -> str:
    """The configured chat format, else the packaged model's own ("" : the GGUF's template)."""
    if config.chat_format or config.model_path:
        return config.chat_format
    return PACKAGED[config.packaged or DEFAULT_PACKAGED].chat_format


def _load_model(config: ProviderConfig) -> tuple[_Model, Path]:
    """Blocking: resolve, self-check and load the model. Raises ``LoadError``."""
    llama_cpp = _import_llama_cpp()
    if config.model_path:
        path = Path(config.model_path).expanduser()
        if not path.is_file():
            raise LoadError(f"model file not found: {path}")
    else:
        path = packaged_model_path(config.packaged or DEFAULT_PACKAGED)
    threads = _n_threads(config.n_threads)
    selfcheck(path, config.n_ctx, threads)
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=config.n_ctx, n_threads=threads, n_threads_batch=threads,
            chat_format=_chat_format(config) or None, verbose=False,
        )
    except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError with little detail
        raise LoadError(f"cannot load {path}: {exc}") from None
    try:
        handler = (
            llm.chat_handler
            or llm._chat_handlers.get(llm.chat_format)
            or llama_cpp.llama_chat_format.get_chat_completion_handler(llm.chat_format)
        )
    except ValueError as exc:
        llm.close()
        raise LoadError(f"chat_format {config.chat_format!r}: {exc}") from None
    model = _Model(llm=llm, llama_cpp=llama_cpp, handler=handler, chat_format=llm.chat_format or "",
                   n_ctx=llm.n_ctx())
    try:
        model.prompt([{"role": "user", "content": "hi"}])
    except LoadError:
        llm.close()
        raise
    return model, path
