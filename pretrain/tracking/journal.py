"""The offline journal of a run: what could not be sent to MLflow, kept in the run's directory
under `mlflow_offline/` (offline.py describes the files and syncs them). A metrics sink that
loses its server appends here (mlflow_runs.MLflowSink), so this module imports no MLflow."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid

from data_service.remote import as_path, exists, filesystem, is_url, join, listdir, read_text, write_text

OFFLINE = "mlflow_offline"


def offline_dir(run_dir: str) -> str:
    return join(str(run_dir), OFFLINE)


def read_json(path: str) -> dict:
    return json.loads(read_text(path)) if exists(path) else {}


def remove(path: str) -> None:
    if is_url(path):
        if filesystem(path).exists(path):
            filesystem(path).rm_file(path)
    else:
        as_path(path).unlink(missing_ok=True)


def now_ms() -> int:
    return int(time.time() * 1000)


class Journal:
    """One writer's metric records in a run's offline directory (see the module docstring)."""

    def __init__(self, run_dir: str, writer: str | None = None) -> None:
        self.run_dir, self.dir = str(run_dir), offline_dir(str(run_dir))
        raw = writer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.writer = re.sub(r"[^A-Za-z0-9-]", "-", raw)
        self.count, self.segment = 0, 0

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r) + "\n" for r in records)
        if is_url(self.dir):
            self.segment += 1
            write_text(join(self.dir, f"metrics-{self.writer}.{self.segment:06d}.jsonl"), text)
        else:
            d = as_path(self.dir)
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"metrics-{self.writer}.jsonl", "a") as f:
                f.write(text)
        self.count += len(records)

    def mark_sent(self, n: int | None = None) -> None:
        """The first `n` records (default: all written) are in MLflow."""
        write_text(join(self.dir, f"metrics-{self.writer}.sent"), json.dumps({"records": self.count if n is None else n}))


def journals(run_dir: str) -> dict[str, tuple[list[dict], int]]:
    """{writer: (its records in order, how many were sent)} of a run directory."""
    d = offline_dir(run_dir)
    parts: dict[str, list[tuple[int, str]]] = {}
    for name in listdir(d):
        m = re.fullmatch(r"metrics-([A-Za-z0-9-]+)(?:\.(\d+))?\.jsonl", name)
        if m:
            parts.setdefault(m[1], []).append((int(m[2] or 0), name))
    out = {}
    for writer, files in parts.items():
        records = []
        for _, name in sorted(files):
            for line in read_text(join(d, name)).splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a process that died writing it
                    pass
        out[writer] = (records, int(read_json(join(d, f"metrics-{writer}.sent")).get("records", 0)))
    return out
