"""The run's state files under `<out>/_batchrun/`: the fingerprint, reports, heartbeats, records.

Each file is written whole and atomically (runner/store/atomic.py) by the one task that owns it;
readers (`batchrun status`, the next attempt) see the previous version or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import posixpath

from runner.faults import kill_point
from runner.io.retry import retry
from runner.io.storage import is_local, url_to_fs
from runner.store.atomic import TEMP_PREFIX, remove_temps, write_bytes_atomic

logger = logging.getLogger(__name__)

STATE_DIR = "_batchrun"


class FingerprintMismatch(Exception):
    """The output holds progress of a different run (model, prompt, sampling, input ...)."""


class CheckpointError(RuntimeError):
    """The committed state of a shard does not allow the requested step."""


class StateStore:
    """An output root and the state files under its `_batchrun/` folder."""

    def __init__(self, url: str, storage_options: dict):
        self.url = url
        self.fs, self.root = url_to_fs(url, storage_options)
        self.root = self.root.rstrip("/")

    # ---- run fingerprint

    def record_fingerprint(self, fingerprint: dict) -> None:
        """Record the run's fingerprint on the first run; refuse to resume a different run."""
        fingerprint = json.loads(json.dumps(fingerprint, default=str))  # compare as stored
        previous = self.read_json("run.json")
        if previous is None:
            # several tasks may start at once, each writing it while absent: no temp is a killed writer's
            self.write_json("run.json", fingerprint, clear_temps=False)
            kill_point("fingerprint_written")
            return
        # only written while absent, so no other task is writing it now: its temps are a killed writer's
        self._remove_temps(self._state("run.json"))
        diffs = _diff(previous, fingerprint)
        if diffs:
            raise FingerprintMismatch(
                f"output {self.url} holds the progress of a different run:\n"
                + "".join(f"  {d}\n" for d in diffs)
                + "Use a new output path, or pass --force-new-run to discard this output's progress."
            )

    # ---- small state files

    def write_json(self, relpath: str, obj: dict, clear_temps: bool = True) -> None:
        """Write `obj` atomically to `<out>/_batchrun/<relpath>`, a file of this task alone (a report)."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n"
        self.write_state(relpath, data, clear_temps)

    def read_json(self, relpath: str) -> dict | None:
        """The object in `<out>/_batchrun/<relpath>`, or None if there is none."""
        data = self.read_state(relpath)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise CheckpointError(f"{self._state(relpath)} is not valid JSON ({e}); fix or remove it") from e

    def write_state(self, relpath: str, data: bytes, clear_temps: bool = True) -> None:
        """Write `data` atomically to `<out>/_batchrun/<relpath>`, a file of this task alone.

        Temp files that a killed earlier writer of it left are removed first (`clear_temps`).
        """
        path = self._state(relpath)
        if clear_temps:
            self._remove_temps(path)
        retry(f"writing {self._name(path)}", lambda: write_bytes_atomic(self.fs, path, data))

    def clear_state_temps(self, relpath: str) -> None:
        """Remove temp files that a killed writer of `<out>/_batchrun/<relpath>` left behind."""
        self._remove_temps(self._state(relpath))

    def read_state(self, relpath: str) -> bytes | None:
        """The bytes of `<out>/_batchrun/<relpath>`, or None if there is none."""
        path = self._state(relpath)
        self._invalidate(path)
        try:
            return retry(f"reading {self._name(path)}", lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def list_state(self, reldir: str) -> list[str]:
        """File names in `<out>/_batchrun/<reldir>/` (temp files excluded), sorted."""
        path = self._state(reldir)
        self._invalidate(path + "/")
        try:
            names = retry(f"listing {self._name(path)}", lambda: self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        return sorted(n for n in map(posixpath.basename, names) if not n.startswith(TEMP_PREFIX))

    # ---- helpers

    def _path(self, relpath: str) -> str:
        return posixpath.join(self.root, relpath)

    def _state(self, relpath: str) -> str:
        return posixpath.join(self.root, STATE_DIR, relpath)

    def _name(self, path: str) -> str:
        """`path` as messages show it: with its scheme on object stores (s3://bucket/key)."""
        return path if is_local(self.fs) else self.fs.unstrip_protocol(path)

    def _remove_temps(self, path: str) -> None:
        for temp in remove_temps(self.fs, path):
            logger.info("removed %s, left by a killed writer", temp)

    def _invalidate(self, path: str) -> None:
        """Forget cached listings: another process (an earlier attempt) may have written here."""
        self.fs.invalidate_cache(posixpath.dirname(path))
        self.fs.invalidate_cache(path)


def _diff(old: object, new: object, prefix: str = "") -> list[str]:
    """One 'path: old -> new' line per differing leaf of two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(old.keys() | new.keys(), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in new:
                out.append(f"{path}: {json.dumps(old[key])} -> <absent>")
            elif key not in old:
                out.append(f"{path}: <absent> -> {json.dumps(new[key])}")
            else:
                out.extend(_diff(old[key], new[key], path))
        return out
    return [] if old == new else [f"{prefix or '<fingerprint>'}: {json.dumps(old)} -> {json.dumps(new)}"]
