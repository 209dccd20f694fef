"""The corpus manifest: one table of sessions, readable without opening any session.

It is derived data: every row is built from a session group's own attributes, so a manifest
lost or left stale by a killed writer is rebuilt by `reconcile` (which the writer runs on
every open). It is replaced atomically (write a temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .format import FORMAT_VERSION, MANIFEST, SESSIONS

COLUMNS = [
    "session_id", "subject", "species", "task", "n_units", "n_spikes", "duration_s", "t_start", "t_end",
    "behaviours", "interval_sets", "train_s", "valid_s", "test_s", "timing_resolution_s",
    "source_format", "source_file", "source_sha256", "source_n_sessions", "content_hash", "written_at",
]


def row_from_attrs(a: dict) -> dict:
    """The manifest row of one session, from its group's `popscale` attributes."""
    split_s = a.get("split_seconds", {})
    return {
        "session_id": a["session_id"],
        "subject": a["subject"],
        "species": a.get("species", "unknown"),
        "task": a.get("task", "unknown"),
        "n_units": a["n_units"],
        "n_spikes": a["n_spikes"],
        "duration_s": a["duration_s"],
        "t_start": a["t_start"],
        "t_end": a["t_end"],
        "behaviours": sorted(a.get("behaviour", {})),
        "interval_sets": sorted(a.get("interval_sets", {})),
        "train_s": split_s.get("train", 0.0),
        "valid_s": split_s.get("valid", 0.0),
        "test_s": split_s.get("test", 0.0),
        "timing_resolution_s": a.get("timing_resolution_s"),
        "source_format": a["source"]["format"],
        "source_file": a["source"]["path"],
        "source_sha256": a["source"]["sha256"],
        "source_n_sessions": a["source"].get("n_sessions", 1),
        "content_hash": a["content_hash"],
        "written_at": a.get("written_at"),
    }


def session_attrs(session_dir: Path) -> dict:
    """A session group's `popscale` attributes, read straight from its zarr.json."""
    meta = json.loads((session_dir / "zarr.json").read_text())
    return meta["attributes"]["popscale"]


def read_manifest(root: Path) -> dict[str, dict]:
    p = root / MANIFEST
    if not p.exists():
        return {}
    doc = json.loads(p.read_text())
    return {r["session_id"]: r for r in doc["sessions"]}


def manifest_text(rows: dict[str, dict]) -> str:
    """The manifest file's content for these rows."""
    doc = {
        "format": "popscale-corpus-manifest",
        "format_version": FORMAT_VERSION,
        "columns": COLUMNS,
        "sessions": [rows[k] for k in sorted(rows)],
    }
    return json.dumps(doc, indent=0, separators=(",", ":"))


def write_manifest(root: Path, rows: dict[str, dict]) -> None:
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(manifest_text(rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def reconcile(root: Path) -> tuple[dict[str, dict], list[str]]:
    """Bring the manifest in line with the session groups on disk; return (rows, what changed)."""
    rows = read_manifest(root)
    changes: list[str] = []
    on_disk = {p.name for p in (root / SESSIONS).iterdir() if p.is_dir() and (p / "zarr.json").exists()}
    for sid in sorted(set(rows) - on_disk):
        del rows[sid]
        changes.append(f"dropped manifest row of missing session {sid}")
    for sid in sorted(on_disk):
        a = session_attrs(root / SESSIONS / sid)
        if sid not in rows or rows[sid]["content_hash"] != a["content_hash"]:
            rows[sid] = row_from_attrs(a)
            changes.append(f"registered session {sid} found on disk")
    if changes or not (root / MANIFEST).exists():
        write_manifest(root, rows)
    return rows, changes


def fingerprint(rows: dict[str, dict]) -> str:
    """Identifies the corpus content: changes when any session is added, removed or rewritten."""
    h = hashlib.sha256()
    for sid in sorted(rows):
        h.update(f"{sid}:{rows[sid]['content_hash']}\n".encode())
    return h.hexdigest()[:16]
