import json
from pathlib import Path

import pytest

from runner.models import fetch as model_fetch
from runner.models.resolve import ModelError, resolve_model
from tests.test_s3_job import upload


@pytest.fixture
def model_url(s3, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> tuple[str, dict]:
    fs, bucket, options = s3
    monkeypatch.setenv("BATCHRUN_CACHE", str(tmp_path / "cache"))
    upload(fs, tiny_model_dir, f"{bucket}/models/tiny")
    return f"s3://{bucket}/models/tiny", options


def test_a_model_url_is_downloaded_once_into_the_cache(
    model_url, tiny_model_dir: Path, tmp_path, monkeypatch
):
    url, options = model_url
    model = resolve_model(url, None, options)
    folder = Path(model.local_path)
    assert model.source == "url" and folder.parent == tmp_path / "cache/models"
    expected = sorted(p.name for p in tiny_model_dir.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*expected, model_fetch.MANIFEST])
    assert (folder / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert sorted(model.fingerprint["sha256"]) == expected and model.fingerprint["url"] == url

    def no_download(*args):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(model_fetch, "_download", no_download)
    assert resolve_model(url, None, options) == model

    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(
        ModelError, match=rf"the cached copy {weights} of {url} is damaged .* remove {folder} "
    ):
        resolve_model(url, None, options)


def test_changed_weights_download_again(model_url, s3):
    url, options = model_url
    fs, bucket, _ = s3
    first = resolve_model(url, None, options)
    config = json.loads(fs.cat(f"{bucket}/models/tiny/config.json"))
    fs.pipe(f"{bucket}/models/tiny/config.json", json.dumps({**config, "note": "retrained"}).encode())
    second = resolve_model(url, None, options)
    assert second.local_path != first.local_path
    assert second.fingerprint["sha256"]["config.json"] != first.fingerprint["sha256"]["config.json"]


@pytest.mark.parametrize(
    "change, error",
    [
        ({"etag": "0" * 32}, r"{url}/config.json arrived corrupted \(MD5 [0-9a-f]{{32}}, ETag 0{{32}}\)"),
        ({"size": 0}, r"downloaded \d+ bytes of {url}/config.json, its listing says 0"),
    ],
)
def test_a_corrupted_download_leaves_nothing_in_the_cache(model_url, tmp_path, monkeypatch, change, error):
    url, options = model_url
    listing = model_fetch._listing

    def tampered(fs, root, url):
        found = listing(fs, root, url)
        return {**found, "config.json": {**found["config.json"], **change}}

    monkeypatch.setattr(model_fetch, "_listing", tampered)
    with pytest.raises(ModelError, match=error.format(url=url)):
        resolve_model(url, None, options)
    assert [p.suffix for p in (tmp_path / "cache/models").iterdir()] == [".lock"]


def test_a_model_url_without_a_model_is_refused(s3):
    _, bucket, options = s3
    with pytest.raises(ModelError, match=rf"s3://{bucket}/nothing holds no config.json .*found 0 objects"):
        resolve_model(f"s3://{bucket}/nothing", None, options)
    with pytest.raises(ModelError, match="model.revision: 'main' applies to hub ids only"):
        resolve_model(f"s3://{bucket}/nothing", "main", options)
