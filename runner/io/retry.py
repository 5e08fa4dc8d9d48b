"""Storage calls that survive transient failures: retried with exponential backoff, logged in words.

Object stores throttle (SlowDown, 503), reset connections and time out; a job of a million rows
must ride through that. `retry(what, call)` retries a call that failed transiently, sleeping
`first_s`, 2x, 4x ... (at most `max_s`, with jitter) and logging each retry; after the last attempt,
or at once for a permanent failure (permission denied, disk full, ...), it raises `StorageError`
saying what failed and what to do. A missing file (FileNotFoundError) or an existing one
(FileExistsError) is an answer, not a failure: it is raised unchanged, as are non-I/O errors.
Rows already committed are never touched by a failed call, so a stopped job resumes safely.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}
# what s3fs / gcsfs / aiohttp put in the messages of throttling and server errors
_TRANSIENT_WORDS = (
    "slowdown",
    "slow down",
    "throttl",
    "too many requests",
    "serviceunavailable",
    "service unavailable",
    "internalerror",
    "internal server error",
    "requesttimeout",
    "timed out",
    "connection reset",
    " 500 ",
    " 502 ",
    " 503 ",
    " 504 ",
    "status 500",
    "status 503",
)
_HINTS = {
    errno.ENOSPC: "the disk is full: free some space, or point output.path at a larger disk",
    errno.EDQUOT: "the disk quota is exhausted: free some space, or point output.path elsewhere",
    errno.EACCES: "permission denied: check the path's permissions or the storage credentials",
    errno.EPERM: "not permitted: check the path's permissions or the storage credentials",
    errno.EROFS: "the file system is read-only: point output.path at a writable location",
}


# botocore's NoCredentialsError / PartialCredentialsError, google-auth's DefaultCredentialsError
_NO_CREDENTIALS = (
    "no credentials for this storage: set them in the environment (S3: AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; GCS: GOOGLE_APPLICATION_CREDENTIALS) or in the path's "
    "storage_options, or use storage_options {anon: true} for a public bucket"
)


class StorageError(OSError):
    """A storage call failed for good (permanently, or transiently past every retry)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """How often and how patiently a transient failure is retried."""

    attempts: int = 6  # calls in all, the first included
    first_s: float = 0.5
    max_s: float = 20.0


BACKOFF = Backoff()


def is_transient(error: BaseException) -> bool:
    """Whether `error` is worth retrying: a timeout, a reset connection, throttling, a 5xx."""
    if isinstance(error, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    # s3fs turns a botocore ClientError into an OSError with S3's message only ("We encountered an
    # internal error. Please try again."); the error code (InternalError, 503) is in the cause
    text = f" {type(error).__name__}: {error} {error.__cause__ or ''} ".lower()
    return isinstance(error, OSError) and any(word in text for word in _TRANSIENT_WORDS)


def retry(what: str, call: Callable[[], T], backoff: Backoff | None = None) -> T:
    """`call()`, retried on transient storage errors; `what` names the step in logs and errors
    ("writing part out/a.parts/part-000001-x.parquet")."""
    backoff = backoff or BACKOFF
    for attempt in range(1, backoff.attempts + 1):
        try:
            return call()
        except Exception as e:
            if not isinstance(e, OSError):
                if missing_credentials(e):
                    raise StorageError(f"{what} failed: {_describe(e)} — {_NO_CREDENTIALS}") from e
                raise
            if isinstance(e, (StorageError, FileNotFoundError, FileExistsError)):
                raise
            if not is_transient(e):
                hint = _HINTS.get(e.errno, "check the path and the storage options")
                raise StorageError(f"{what} failed: {_describe(e)} — {hint}") from e
            if attempt == backoff.attempts:
                raise StorageError(
                    f"{what} still failed after {attempt} attempts: {_describe(e)} — the storage "
                    "seems unavailable; run the job again later (committed rows are kept)",
                ) from e
            delay = min(backoff.max_s, backoff.first_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            log.warning(
                "%s failed (%s); retrying in %.1f s (attempt %d of %d)",
                what,
                _describe(e),
                delay,
                attempt + 1,
                backoff.attempts,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def missing_credentials(error: BaseException) -> bool:
    """Whether `error` says the storage found no credentials (raised by botocore or google-auth, not as an
    OSError)."""
    return any("Credentials" in cls.__name__ for cls in type(error).__mro__)


def _describe(error: BaseException) -> str:
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"{type(error).__name__}: {text}"
