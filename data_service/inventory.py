"""`popscale inspect`: what a corpus holds, from the manifest alone (no session is opened)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from .manifest import fingerprint, read_manifest
from .remote import as_path


def summarize(root: Path | str) -> dict:
    rows = read_manifest(as_path(str(root)))  # a local path or a URL on shared storage
    subjects: dict[str, dict] = defaultdict(lambda: {"sessions": 0, "units": 0, "spikes": 0, "hours": 0.0})
    behaviours: Counter = Counter()
    formats: Counter = Counter()
    for r in rows.values():
        sub = subjects[r["subject"]]
        sub["sessions"] += 1
        sub["units"] += r["n_units"]
        sub["spikes"] += r["n_spikes"]
        sub["hours"] += r["duration_s"] / 3600
        behaviours.update(r["behaviours"])
        formats[r["source_format"]] += 1
    h = lambda key: sum(r[key] for r in rows.values()) / 3600  # noqa: E731
    return {
        "corpus": str(root),
        "fingerprint": fingerprint(rows),
        "sessions": len(rows),
        "subjects": len(subjects),
        "units": sum(r["n_units"] for r in rows.values()),
        "spikes": sum(r["n_spikes"] for r in rows.values()),
        "hours": h("duration_s"),
        "split_hours": {"train": h("train_s"), "valid": h("valid_s"), "test": h("test_s")},
        "behaviours": dict(behaviours),
        "source_formats": dict(formats),
        "by_subject": {k: subjects[k] for k in sorted(subjects)},
        "session_rows": [rows[k] for k in sorted(rows)],
    }
