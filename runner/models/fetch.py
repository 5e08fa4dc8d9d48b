"""Models at a URL (`s3://bucket/models/x/`, `gs://...`): downloaded once into the local cache, checked.

The folder's listing (names, sizes, ETags) keys the cache, so changed weights download again and
unchanged ones never do. Each object is streamed to a temporary folder while its size and — where
the ETag is a plain MD5, i.e. a single-part upload — its MD5 are checked; the folder is then renamed
into place under a file lock, so a killed download never leaves a folder that looks complete and
concurrent jobs on one node download once. The fingerprint is the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from runner.io.storage import url_to_fs
from runner.models.cache import cache_dir

log = logging.getLogger(__name__)

MANIFEST = "batchrun_download.json"  # written last into a downloaded folder: what it holds
_MD5 = re.compile(r"[0-9a-f]{32}")
_CHUNK = 8 << 20


class ModelDownloadError(ValueError):
    """The model URL cannot be downloaded as a Hugging Face folder; the message names the object."""


def is_url(path: str) -> bool:
    """Whether `model.path` names a remote folder (an fsspec URL other than file://)."""
    protocol, _ = path.split("://", 1) if "://" in path else (None, path)
    return protocol not in (None, "file", "local")


def fetch_model(url: str, storage_options: dict) -> tuple[Path, dict]:
    """The local copy of the Hugging Face folder at `url` (downloaded if needed) and its fingerprint."""
    fs, root = url_to_fs(url, storage_options)
    root = root.rstrip("/")
    listing = _listing(fs, root, url)
    key = hashlib.sha256(json.dumps([url, listing], sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]+", "-", posixpath.basename(root)).lower() or "model"
    dest = cache_dir() / "models" / f"{name}-{key}"
    if not (dest / MANIFEST).is_file():
        _download_once(fs, root, url, listing, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    for rel, entry in manifest["files"].items():
        size = (dest / rel).stat().st_size if (dest / rel).is_file() else None
        if size != entry["size"]:
            raise ModelDownloadError(
                f"model.path: the cached copy {dest / rel} of {url} is damaged (size {size}, expected "
                f"{entry['size']}); remove {dest} to download it again"
            )
    return dest, {"url": url, "sha256": {rel: e["sha256"] for rel, e in manifest["files"].items()}}


def _listing(fs, root: str, url: str) -> dict[str, dict]:
    """{relative name: {size, etag}} of every object under the model URL."""
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    listing = {
        path[len(root) :].lstrip("/"): {"size": info["size"], "etag": str(info.get("ETag", "")).strip('"')}
        for path, info in found.items()
        if info["type"] == "file"
    }
    if "config.json" not in listing:
        raise ModelDownloadError(
            f"model.path: {url} holds no config.json (expected a Hugging Face model folder; check the URL "
            f"and model.storage_options; found {len(listing)} objects)"
        )
    return listing


def _download_once(fs, root: str, url: str, listing: dict[str, dict], dest: Path) -> None:
    def download(tmp: Path) -> None:
        files = {rel: _download(fs, f"{root}/{rel}", tmp / rel, entry) for rel, entry in listing.items()}
        (tmp / MANIFEST).write_text(json.dumps({"url": url, "files": files}, indent=2) + "\n")

    build_folder_once(dest, MANIFEST, f"downloading {url}", download)


def build_folder_once(dest: Path, marker: str, what: str, build: Callable[[Path], None]) -> None:
    """Build the cache folder `dest` once, whatever other processes do at the same time.

    Under a file lock, `build(tmp)` fills a temp folder that is renamed into place; `build` writes
    `marker` last, so a `dest` without it (a killed build) is never trusted but rebuilt.
    """
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / marker).is_file():  # another process finished it while we waited
            return
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        if dest.exists():  # a folder without its marker was never completed
            shutil.rmtree(dest)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        log.info("%s into %s (once)", what, dest)
        try:
            build(tmp)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _download(fs, path: str, target: Path, entry: dict) -> dict:
    """Stream one object to `target`, checking its size and MD5 ETag; returns its manifest entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sha256, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with fs.open(path, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    url = fs.unstrip_protocol(path)
    if size != entry["size"]:
        raise ModelDownloadError(
            f"model.path: downloaded {size} bytes of {url}, its listing says {entry['size']} (it changed "
            "during the download?); run the job again"
        )
    if _MD5.fullmatch(entry["etag"]) and md5.hexdigest() != entry["etag"]:
        raise ModelDownloadError(
            f"model.path: {url} arrived corrupted (MD5 {md5.hexdigest()}, ETag {entry['etag']}); "
            "run the job again"
        )
    return {"size": size, "sha256": sha256.hexdigest()}
