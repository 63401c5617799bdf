"""Removing secrets (an API key, configured header values) from text before it is logged.

Upstreams echo keys back in error bodies, whole or cut, sometimes encoded or spaced out.
For a secret of 8 or more characters, every run of 8 or more of its consecutive characters
is removed, in these forms: as is, in any case, with separators (spaces, dashes, dots,
newlines...) between the characters, and as base64 (standard and URL-safe), hex and
percent-encoding, wherever the run starts (for the encodings: any 8 encoded characters). A shorter secret is removed where it appears
whole. The text is redacted whole, before anything cuts it.
"""

from __future__ import annotations

import base64
import re
import string
import urllib.parse

RUN = 8  # the shortest run of a secret's characters that is removed
MASK = "***"
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")
_ALNUM = re.compile(r"[0-9a-z]")
_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # keeps every index in place


def _forms(secret: str) -> list[str]:
    """The secret and its encodings. Every run of ``RUN`` characters of each is removed: for hex
    and base64 that is a little stricter than ``RUN`` characters of the secret (4 and 6)."""
    raw = secret.encode("utf-8", "surrogatepass")
    forms = [secret, urllib.parse.quote(secret, safe=""), raw.hex()]
    for offset in range(3):  # base64 aligns on 3 bytes: a run can start at any of them
        b64 = base64.b64encode(raw[offset:]).decode().rstrip("=")
        b64 = b64[: len(b64) - 3]  # the last group depends on what follows the secret
        forms += [b64, b64.replace("+", "-").replace("/", "_")]
    return forms


class Redactor:
    """``redactor(text)``: ``text`` with every trace of the secrets replaced by ``***``."""

    def __init__(self, secrets) -> None:
        self._whole: list[str] = []  # short secrets: removed where they appear whole
        self._grams: set[str] = set()  # every RUN-character run of every form, lower-cased
        self._compact: set[str] = set()  # the same, of the forms with only their letters and digits
        for secret in secrets:
            if not secret:
                continue
            if len(secret) < RUN:
                self._whole.append(secret)
                continue
            for form in _forms(secret):
                low = form.translate(_LOWER)
                self._grams.update(low[i:i + RUN] for i in range(len(low) - RUN + 1))
                compact = _NOT_ALNUM.sub("", low)
                self._compact.update(compact[i:i + RUN] for i in range(len(compact) - RUN + 1))

    def __bool__(self) -> bool:
        return bool(self._whole or self._grams)

    def __call__(self, text: str) -> str:
        for secret in self._whole:
            text = text.replace(secret, MASK)
        if not self._grams or not text:
            return text
        low = text.translate(_LOWER)
        hit = bytearray(len(text))  # 1 where a character belongs to a secret
        grams, mark = self._grams, b"\x01" * RUN
        for i in [i for i in range(len(low) - RUN + 1) if low[i:i + RUN] in grams]:
            hit[i:i + RUN] = mark
        # Separated forms: match on the letters and digits alone, mapped back to their places.
        compact, grams = _NOT_ALNUM.sub("", low), self._compact
        found = [j for j in range(len(compact) - RUN + 1) if compact[j:j + RUN] in grams]
        if found:
            where = [m.start() for m in _ALNUM.finditer(low)]
            for j in found:
                start, end = where[j], where[j + RUN - 1] + 1
                hit[start:end] = b"\x01" * (end - start)
        if not any(hit):
            return text
        out, i = [], 0
        while i < len(text):
            if hit[i]:
                while i < len(text) and hit[i]:
                    i += 1
                out.append(MASK)
            else:
                j = hit.find(b"\x01", i)
                j = len(text) if j < 0 else j
                out.append(text[i:j])
                i = j
        return "".join(out)
