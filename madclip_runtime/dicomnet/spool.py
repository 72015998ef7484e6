"""The node's durable state: every directory a restart needs, and nothing kept only in memory.

    SPOOL/incoming/<series key>/<SOPInstanceUID>.dcm   received instances, fsync'ed before the Success status
    SPOOL/outbox/<item>/{seg.dcm, sr.dcm, result.json, state.json}   results waiting to be sent (retries)
    SPOOL/sent/<item>.json                              journal of what was sent (and which instances it used)
    SPOOL/failed/<item>/{*.dcm, reason.txt}             series that were not scored, with the reason

The series key is a hash of the SeriesInstanceUID, so no identifier of the patient or study appears in a
path. An outbox item is written as a whole (a hidden temporary directory renamed into place) BEFORE the
incoming instances it used are deleted; on restart, instances that a committed item already lists are
removed instead of being scored twice, so a crash at any point neither loses nor duplicates a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Iterable

from ..atomic import AtomicDirectory, atomic_write_bytes, atomic_write_text
from ..outputs import mark_output_dir

INCOMING, OUTBOX, SENT, FAILED = "incoming", "outbox", "sent", "failed"


def series_key(series_uid: str) -> str:
    """A path-safe, identifier-free name for a series folder."""
    return hashlib.sha256(series_uid.encode("utf-8")).hexdigest()[:24]


def _safe_uid(uid: str) -> str:
    """A SOP Instance UID as a file name (UIDs are digits and dots; anything else is hashed)."""
    return uid if uid and all(c.isdigit() or c == "." for c in uid) and len(uid) <= 64 else series_key(uid)


class Spool:
    """The directories above, with the few operations the node needs (all crash-safe)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        for sub in (INCOMING, OUTBOX, SENT, FAILED):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._cleanup_temporaries()

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _cleanup_temporaries(self) -> None:
        """Remove hidden temporaries a crash left behind (never a committed file or item)."""
        for sub in (INCOMING, OUTBOX, SENT, FAILED):
            base = self.path(sub)
            for dirpath, dirnames, filenames in os.walk(base):
                for name in list(dirnames) + filenames:
                    if name.startswith(".") and (".tmp-" in name or ".old-" in name):
                        full = os.path.join(dirpath, name)
                        shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]

    # --------------------------------------------------------------------------------------- incoming
    def store_instance(self, key: str, sop_uid: str, data: bytes) -> tuple[str, bool]:
        """Write one received instance durably (fsync'ed file and directory). -> (path, new instance?)."""
        folder = self.path(INCOMING, key)
        path = os.path.join(folder, _safe_uid(sop_uid) + ".dcm")
        for attempt in range(
            3
        ):  # the scoring worker may remove the emptied folder between makedirs and write
            os.makedirs(folder, exist_ok=True)
            existed = os.path.exists(path)
            try:
                atomic_write_bytes(path, data)
                return path, not existed
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def incoming_series(self) -> list[str]:
        return sorted(d for d in os.listdir(self.path(INCOMING)) if not d.startswith("."))

    def incoming_files(self, key: str) -> list[str]:
        folder = self.path(INCOMING, key)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(folder, n) for n in names if n.endswith(".dcm") and not n.startswith("."))

    def remove_incoming(self, files: Iterable[str]) -> None:
        for f in files:
            try:
                os.remove(f)
            except FileNotFoundError:
                pass

    def drop_empty(self, key: str) -> bool:
        """Remove the series folder when no instance is left in it. -> removed?"""
        try:
            os.rmdir(self.path(INCOMING, key))
            return True
        except OSError:
            return False

    # --------------------------------------------------------------------------------------- outbox
    def commit_result(self, key: str, objects: dict[str, bytes], doc: dict[str, Any]) -> str:
        """Put the result objects and their description in the outbox as one atomic item. -> item name."""
        item = f"{time.strftime('%Y%m%dT%H%M%S')}-{key[:12]}-{os.urandom(3).hex()}"
        with AtomicDirectory(self.path(OUTBOX, item)) as tmp:
            mark_output_dir(tmp)  # results: never read back as scans (madclip_runtime.outputs)
            for name, data in objects.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            atomic_write_text(os.path.join(tmp, "result.json"), json.dumps(doc, indent=1, allow_nan=False))
            atomic_write_text(os.path.join(tmp, "state.json"), json.dumps({"attempts": 0, "next_try": 0.0}))
        return item

    def outbox_items(self) -> list[str]:
        return sorted(d for d in os.listdir(self.path(OUTBOX)) if not d.startswith("."))

    def item_doc(self, item: str) -> dict[str, Any]:
        with open(self.path(OUTBOX, item, "result.json"), encoding="utf-8") as f:
            return json.load(f)

    def item_state(self, item: str) -> dict[str, Any]:
        try:
            with open(self.path(OUTBOX, item, "state.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"attempts": 0, "next_try": 0.0}

    def set_item_state(self, item: str, state: dict[str, Any]) -> None:
        atomic_write_text(self.path(OUTBOX, item, "state.json"), json.dumps(state))

    def item_objects(self, item: str) -> list[str]:
        folder = self.path(OUTBOX, item)
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".dcm"))

    def mark_sent(self, item: str, summary: dict[str, Any]) -> None:
        """Journal first, then drop the item: a crash in between re-sends (a PACS keeps one copy per UID)."""
        atomic_write_text(self.path(SENT, item + ".json"), json.dumps(summary, indent=1, allow_nan=False))
        shutil.rmtree(self.path(OUTBOX, item), ignore_errors=True)

    def used_instance_files(self) -> dict[str, float]:
        """{incoming file path: when the result using it was committed} over pending and sent results.

        A file written after that time is a new copy of the instance (the series was sent again), not a
        leftover.
        """
        docs: list[dict[str, Any]] = []
        for item in self.outbox_items():
            try:
                docs.append(self.item_doc(item))
            except (OSError, ValueError):
                continue
        for name in os.listdir(self.path(SENT)):
            if name.endswith(".json") and not name.startswith("."):
                try:
                    with open(self.path(SENT, name), encoding="utf-8") as f:
                        docs.append(json.load(f))
                except (OSError, ValueError):
                    continue
        used: dict[str, float] = {}
        for doc in docs:
            at = float(doc.get("committed_at", 0.0))
            for f in doc.get("instance_files", []):
                used[f] = max(used.get(f, 0.0), at)
        return used

    # --------------------------------------------------------------------------------------- failed
    def move_failed(self, key: str, files: Iterable[str], reason: str) -> str:
        """Move a series' instances out of incoming, with the reason beside them. -> the folder."""
        folder = self.path(FAILED, f"{time.strftime('%Y%m%dT%H%M%S')}-{key[:12]}-{os.urandom(3).hex()}")
        os.makedirs(folder)
        atomic_write_text(os.path.join(folder, "reason.txt"), reason + "\n")
        for f in files:
            try:
                os.replace(f, os.path.join(folder, os.path.basename(f)))
            except FileNotFoundError:
                pass
        return folder
