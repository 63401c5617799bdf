"""Builds the configured providers and resolves what clients call a model.

A model id is ``provider/model``. A provider's name and each of its aliases
stand for its first model, so the seed's ``modelType`` values (``chatgpt``,
``deepseek``, ``local``) keep working. A bare model name is accepted when exactly
one provider serves it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp

from ..config import ProviderConfig, Settings, model_names
from .base import Provider
from .openai import OpenAIProvider

log = logging.getLogger(__name__)

DEFAULT_ORDER = ("deepseek", "openai", "local")


class ModelError(Exception):
    """A model id that does not resolve or cannot be used; ``code`` is the protocol's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Resolved:
    id: str  # "provider/model"
    provider: Provider
    model: str


def make_provider(config: ProviderConfig, http: aiohttp.ClientSession) -> Provider:
    if config.kind == "llamacpp":
        try:
            from .llamacpp import LlamaCppProvider  # imports nothing heavy until a model is used
        except ImportError as exc:
            return Unusable(config, f"the embedded model support failed to load: {exc}")
        return LlamaCppProvider(config)
    return OpenAIProvider(config, http)


class Unusable:
    """A configured provider that cannot work here; listed with the reason, never called."""

    single_slot = False
    supports_tools = False

    def __init__(self, config: ProviderConfig, reason: str) -> None:
        self.name, self.models, self.label = config.name, config.models, config.label or config.name
        self._reason = reason

    def unavailable_reason(self) -> str | None:
        return self._reason

    def stream(self, request):  # pragma: no cover - resolve() refuses unavailable providers first
        raise RuntimeError(self._reason)

    async def close(self) -> None:
        return None


class Registry:
    def __init__(self, settings: Settings, http: aiohttp.ClientSession, providers: dict[str, Provider] | None = None):
        self.settings = settings
        self.providers: dict[str, Provider] = providers if providers is not None else {
            name: make_provider(cfg, http) for name, cfg in settings.providers.items()
        }
        usable = {n: cfg for n, cfg in settings.providers.items() if n in self.providers}
        self._names = model_names(usable)

    def canonical(self, name: str) -> str:
        """The ``provider/model`` id for ``name``; raises ``unknown_model``."""
        try:
            return self._names[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(k for k in self._names if "/" in k)) or "none"
            raise ModelError("unknown_model", f"Unknown model {str(name)[:100]!r}. Known models: {known}") from None

    def resolve(self, name: str) -> Resolved:
        """Resolve and check availability; raises ``unknown_model`` or ``provider_unavailable``."""
        model_id = self.canonical(name)
        pname, _, model = model_id.partition("/")
        provider = self.providers[pname]
        reason = provider.unavailable_reason()
        if reason:
            raise ModelError("provider_unavailable", f"{provider.label} is not available: {reason}")
        return Resolved(model_id, provider, model)

    def default_model(self) -> str:
        """The configured default, else the first usable built-in, else the first model."""
        wanted = self.settings.chat.default_model
        if wanted:
            return self.canonical(wanted)
        ordered = [n for n in DEFAULT_ORDER if n in self.providers] + [
            n for n in self.providers if n not in DEFAULT_ORDER
        ]
        for name in ordered:
            if self.providers[name].unavailable_reason() is None:
                return self._names[name]
        return self._names[ordered[0]] if ordered else ""

    def listing(self) -> dict:
        """``GET /api/models``: ids, labels and availability; never a key or a URL."""
        models = []
        for name, p in self.providers.items():
            reason = p.unavailable_reason()
            cfg = self.settings.providers[name]
            for i, m in enumerate(p.models):
                models.append({
                    "id": f"{name}/{m}",
                    "provider": name,
                    "label": p.label if len(p.models) == 1 else f"{p.label} · {m}",
                    "aliases": (list(dict.fromkeys([name, *cfg.aliases])) if i == 0 else []),
                    "available": reason is None,
                    "reason": reason,
                })
        return {"models": models, "default": self.default_model()}

    async def close(self) -> None:
        for p in self.providers.values():
            try:
                await p.close()
            except Exception:  # one provider's failure must not keep the others open
                log.exception("closing provider %s", p.name)
