"""``[quotas.default]``, ``[quotas.group.NAME]``, ``[quotas.user.NAME]``: what each identity may spend.

Parsed and checked at load (a typo is one line and exit 2). A rule leaves a key unset (``None``) to
take it from a less specific rule: resolution is per key (``quotas.effective``). ``0`` is unlimited;
``models`` empty is every model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .config_checks import _fail

LIMIT_KEYS = ("tokens_per_day", "tokens_per_month", "messages_per_day", "messages_per_month")


@dataclass(frozen=True)
class QuotaRule:
    """One table of ``[quotas]``; ``None``: not set here (a less specific rule's value applies)."""
    tokens_per_day: int | None = None  # input + output tokens per UTC day; 0: unlimited
    tokens_per_month: int | None = None  # per UTC calendar month
    messages_per_day: int | None = None  # replies started per UTC day
    messages_per_month: int | None = None
    models: tuple[str, ...] | None = None  # globs on the resolved ``provider/model`` id; (): all


@dataclass(frozen=True)
class QuotasConfig:
    default: QuotaRule | None = None  # everyone with an identity
    groups: dict[str, QuotaRule] = field(default_factory=dict)
    users: dict[str, QuotaRule] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.groups) or bool(self.users)


def parse_quotas(table: Any, source: str, model_ids: list[str]) -> QuotasConfig:
    """The ``[quotas]`` table; ``model_ids``: every configured ``provider/model`` (a glob matching
    none of them is refused: almost surely a typo that would forbid everything)."""
    if not isinstance(table, dict):
        raise _fail(source, "[quotas]", "expected a table")
    unknown = set(table) - {"default", "group", "user"}
    if unknown:
        raise _fail(source, f"[quotas.{sorted(unknown)[0]}]", "unknown table (known: default, group.NAME, user.NAME)")
    default = _rule(table["default"], source, "[quotas.default]", model_ids) if "default" in table else None
    named: dict[str, dict[str, QuotaRule]] = {}
    for kind in ("group", "user"):
        rules = table.get(kind, {})
        if not isinstance(rules, dict):
            raise _fail(source, f"[quotas.{kind}]", f"expected tables such as [quotas.{kind}.NAME]")
        named[kind] = {}
        for name, rule in rules.items():
            if not name.strip():
                raise _fail(source, f"[quotas.{kind}]", "a name must not be empty")
            named[kind][name] = _rule(rule, source, f"[quotas.{kind}.{name}]", model_ids)
    return QuotasConfig(default=default, groups=named["group"], users=named["user"])


def _rule(table: Any, source: str, where: str, model_ids: list[str]) -> QuotaRule:
    if not isinstance(table, dict):
        raise _fail(source, where, "expected a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in LIMIT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _fail(source, f"{where} {key}", f"expected a whole number, 0 or more (0: unlimited), got {value!r}")
            values[key] = value
        elif key == "models":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise _fail(source, f"{where} models", f"expected a list of model globs such as \"deepseek/*\", "
                            f"got {value!r}")
            for glob in value:
                if not any(fnmatch.fnmatchcase(m, glob) for m in model_ids):
                    raise _fail(source, f"{where} models", f"{glob!r} matches no configured model "
                                f"(known: {', '.join(model_ids) or 'none'})")
            values[key] = tuple(value)
        else:
            raise _fail(source, f"{where} {key}", f"unknown key (known: {', '.join(LIMIT_KEYS)}, models)")
    return QuotaRule(**values)
