"""Storage faults against a real S3 API, end to end: what a user of `batchrun submit` sees.

Real: the job runs as a subprocess, s3fs/botocore speak HTTP to moto's S3 server, the parts and final
files are real Parquet objects. Injected: S3 error responses (503 SlowDown, 500 InternalError,
403 AccessDenied) that a proxy in front of moto (tests/s3_proxy.py) answers for chosen requests.
botocore's own retries are switched off in the spec's storage options
(`config_kwargs.retries.total_max_attempts: 1`); s3fs retries SlowDown 5 times by itself (not
configurable), so the proxy answers it 5 times for one failure to reach batchrun. The retries
asserted are batchrun's (runner/io/retry.py), in the words it logs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.spec.job import load_spec
from jobs.worker import run_worker
from tests.conftest import read_output, write_inputs, write_spec
from tests.s3_proxy import FaultProxy, Rule
from tests.test_kill_resume import batchrun
from tests.test_s3_job import read_s3_output, upload


@pytest.fixture
def proxied(s3, tmp_path: Path, tiny_model_dir: Path):
    """(filesystem, bucket, proxy, spec reading and writing S3 through the proxy, reference output)."""
    fs, bucket, options = s3
    write_inputs(tmp_path / "in", parquet=2, jsonl=0, rows=7)
    upload(fs, tmp_path / "in", f"{bucket}/in")
    ref = write_spec(tmp_path / "ref.yaml", tiny_model_dir, output={"flush_rows": 3, "path": "ref"})
    run_worker(load_spec(ref), show_progress=False)
    with FaultProxy(options["client_kwargs"]["endpoint_url"]) as proxy:
        opts = {
            "client_kwargs": {"endpoint_url": proxy.url},
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }
        spec = write_spec(
            tmp_path / "s3.yaml",
            tiny_model_dir,
            input={"path": f"s3://{bucket}/in/*", "storage_options": opts},
            output={"path": f"s3://{bucket}/out", "storage_options": opts, "flush_rows": 3},
        )
        yield fs, bucket, proxy, spec, read_output(tmp_path / "ref")


def test_throttling_and_server_errors_are_retried_and_the_output_is_exact(proxied):
    fs, bucket, proxy, spec, reference = proxied
    slow = Rule("POST", "/out/a0.parts/part-000001-", 503, "SlowDown", times=5)  # starting an upload
    broken = Rule("PUT", "/out/a1.parts/part-000000-", 500, "InternalError", times=1)  # its data
    proxy.rules += [slow, broken]

    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    assert len(slow.hits) == 5 and len(broken.hits) == 1
    assert read_s3_output(fs, f"{bucket}/out") == reference
    retried = re.findall(r"WARNING runner\.io\.retry: (.*)", err)
    assert len(retried) == 2, retried
    part = r"\w+\.parquet failed \(OSError: "
    retrying = r"\); retrying in [\d.]+ s \(attempt 2 of 6\)"
    a0 = re.escape(f"writing part s3://{bucket}/out/a0.parts/part-000001-")
    a1 = re.escape(f"writing part s3://{bucket}/out/a1.parts/part-000000-")
    assert re.fullmatch(a0 + part + r"Please reduce your request rate\." + retrying, retried[0])
    internal = r"We encountered an internal error\. Please try again\."
    assert re.fullmatch(a1 + part + internal + retrying, retried[1])


def test_access_denied_stops_the_job_naming_the_object_and_a_rerun_finishes_the_rest(proxied):
    fs, bucket, proxy, spec, reference = proxied
    denied = Rule("POST", "/out/a0.parts/part-000001-", 403, "AccessDenied", times=None)
    proxy.rules.append(denied)

    code, _, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 1, err[-3000:]
    assert len(denied.hits) == 1  # permanent: not retried
    (key,) = re.findall(r"/(out/a0\.parts/part-000001-\w+\.parquet)\?uploads", denied.hits[0])
    assert err.splitlines()[-1] == (
        f"error: writing part s3://{bucket}/{key} failed: PermissionError: Access Denied — check the "
        "path and the storage options"
    )
    committed = [p.rsplit("/", 1)[1][:12] for p in fs.find(f"{bucket}/out/a0.parts")]
    assert committed == ["part-000000-"]  # committed before the denial: kept

    proxy.rules.clear()
    code, out, err = batchrun("submit", str(spec), "--no-progress")
    assert code == 0, err[-3000:]
    assert read_s3_output(fs, f"{bucket}/out") == reference
    assert re.search(r"(\d+) rows ok", out + err).group(1) == str(15 - 3)  # a0's first part was kept
