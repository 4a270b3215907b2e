"""Secrets out of text that came from a remote (an HTTP error body, an LLM answer) before it reaches a
log, a Prefect state, an exception or an artifact.

Order matters: the whole text is scrubbed first and only then cut to a length, so a secret that
straddles the cut is never half-kept (the bug of issue 12: the body was cut to 300 characters,
then the full key was searched in it and no longer found).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
MIN_FRAGMENT = 8
"""A secret's pieces of this many characters are masked too (a server may echo a cut or quoted key)."""

_CREDENTIAL = re.compile(
    r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=\-]+"  # Authorization scheme + value
    r"|(\b(?:authorization|x-api-key|api[-_]?key|access[-_]?token)\b[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?:bearer|basic|token)\s+)?)([^\s\"',;}]+)")


def _mask_credential(m: re.Match[str]) -> str:
    if m.group(1) is not None:
        return f"{m.group(1)}{m.group(2)}{MASK}"
    return f"{m.group(3)}{MASK}"


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every secret, every `MIN_FRAGMENT`-character piece of one, and the value of any
    Authorization / Bearer / api-key field replaced by `***`."""
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, MASK)
        for i in range(len(secret) - MIN_FRAGMENT + 1):
            piece = secret[i:i + MIN_FRAGMENT]
            if piece in text:
                text = text.replace(piece, MASK)
    return _CREDENTIAL.sub(_mask_credential, text)


def excerpt(text: str, limit: int = 300, secrets: Iterable[str | None] = ()) -> str:
    """A scrubbed, one-line excerpt of remote text, at most `limit` characters (scrubbed before it is cut)."""
    clean = " ".join(scrub(text, secrets).split())
    return clean if len(clean) <= limit else clean[:limit] + "..."
