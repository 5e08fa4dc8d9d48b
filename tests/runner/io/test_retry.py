import errno

import pytest

import runner.io.retry
from runner.io.retry import Backoff, StorageError, is_transient, retry

FAST = Backoff(attempts=3, first_s=0.001, max_s=0.002)


@pytest.mark.parametrize(
    "error, transient",
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("read timed out"), True),
        (OSError(errno.EAGAIN, "try again"), True),
        (OSError("An error occurred (SlowDown) when calling the PutObject operation"), True),
        (OSError("503 Service Unavailable"), True),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (FileNotFoundError(errno.ENOENT, "No such file"), False),
        (ValueError("503 in a value error is not I/O"), False),
    ],
)
def test_is_transient(error, transient):
    assert is_transient(error) is transient


def test_transient_errors_are_retried_with_growing_delays_and_logged(monkeypatch, caplog):
    sleeps = []
    monkeypatch.setattr(runner.io.retry.time, "sleep", sleeps.append)
    calls = iter([TimeoutError("timed out"), TimeoutError("timed out"), "ok"])

    def call():
        result = next(calls)
        if isinstance(result, Exception):
            raise result
        return result

    assert retry("reading x", call, Backoff(attempts=3, first_s=1.0, max_s=10.0)) == "ok"
    assert len(sleeps) == 2 and 0.8 <= sleeps[0] <= 1.2 and 1.6 <= sleeps[1] <= 2.4
    assert [r.getMessage()[:52] for r in caplog.records] == [
        "reading x failed (TimeoutError: timed out); retrying",
        "reading x failed (TimeoutError: timed out); retrying",
    ]


def test_permanent_errors_raise_at_once_with_the_fix():
    calls = []

    def call():
        calls.append(1)
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(StorageError) as e:
        retry("writing out/a.parquet", call, FAST)
    assert len(calls) == 1
    assert str(e.value) == (
        "writing out/a.parquet failed: PermissionError: Permission denied — permission denied: check "
        "the path's permissions or the storage credentials"
    )


def test_answers_and_non_io_errors_pass_through_unchanged():
    for error in [FileNotFoundError("gone"), FileExistsError("there"), ValueError("bad")]:
        with pytest.raises(type(error)) as e:
            retry("x", lambda error=error: (_ for _ in ()).throw(error), FAST)
        assert e.value is error
