"""Which errors a retry can fix: the network, S3 throttling or 5xx, an LLM endpoint's 429/5xx, timeouts.

Prefect task retries (tasks/stages.py) ask `is_transient` through their retry condition, so a bad
setting, a missing file or a ValueError fails at once instead of being retried for minutes (issue 12:
a missing `llm.base_url` cost 35 s of task retries before the error showed).
"""

from __future__ import annotations

import errno
import re

_PYARROW_S3 = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT)"
    r"|HTTP status 5\d\d|curlCode: \d+|Connection (reset|refused|timed out)", re.IGNORECASE)
"""Transient S3 failures as pyarrow's S3FileSystem words them in an OSError."""
_S3_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}
_PERMANENT_OSERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _one(exc: BaseException) -> bool:
    from .llm import LLMError

    if isinstance(exc, LLMError):
        return exc.retryable
    if isinstance(exc, (TimeoutError, ConnectionError)):  # builtins: also socket timeouts, resets, refusals
        return True
    try:
        import httpx

        if isinstance(exc, (httpx.TimeoutException, httpx.TransportError)):
            return True
    except ImportError:  # pragma: no cover - httpx ships with Prefect
        pass
    try:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return True
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code in _S3_RETRY_CODES or status == 429 or status >= 500
    except ImportError:  # pragma: no cover - boto3 is a dependency
        pass
    if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OSERRORS):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return False
        return bool(_PYARROW_S3.search(str(exc)))
    return False


def is_transient(exc: BaseException) -> bool:
    """True when a retry may succeed: the error, or an error it was raised from, is a network or S3
    failure, a timeout, or an LLMError marked retryable. Validation errors, missing files and every
    other error are permanent."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if _one(cur):
            return True
        seen.add(id(cur))
        cur = cur.__cause__
    return False
