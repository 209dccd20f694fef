"""Publishing a local corpus to shared storage. Object stores have no rename, so a corpus is
written locally (with the store's crash-safe staging) and then pushed: sessions first, the
manifest and the root `zarr.json` last, so a reader sees either the old corpus or the new one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import CorpusError
from .format import MANIFEST, SESSIONS, check_corpus_root
from .manifest import manifest_text, read_manifest
from .remote import as_path, filesystem, is_url, join


def push_corpus(local_root: str | Path, url: str, *, replace: bool = False,
                on_session: Callable[[str, str], None] | None = None) -> dict[str, int]:
    """Upload a local corpus to `url`: sessions missing there (or changed, with `replace`) file by
    file, then the merged manifest, then the root zarr.json. Returns counts by status."""
    local = Path(local_root)
    check_corpus_root(local)
    rows = read_manifest(local)
    if not is_url(url):
        raise CorpusError("push needs a URL (s3://bucket/prefix); for a local or shared filesystem, copy the "
                          "directory", file=url)
    fs = filesystem(url)
    there: dict[str, dict] = {}
    if fs.exists(join(url, MANIFEST)):
        check_corpus_root(as_path(url))
        there = read_manifest(as_path(url))
    status_of = {sid: "uploaded" if sid not in there else
                 "unchanged" if there[sid]["content_hash"] == rows[sid]["content_hash"] else "replaced"
                 for sid in rows}
    conflict = next((sid for sid in sorted(rows) if status_of[sid] == "replaced"), None)
    if conflict is not None and not replace:  # refused before anything is uploaded
        raise CorpusError(f"session already at {url} with other content (hash {there[conflict]['content_hash']}); "
                          "pass --replace to overwrite it", file=url, session=conflict, field="content_hash")
    counts = {"uploaded": 0, "replaced": 0, "unchanged": 0}
    merged = dict(there)
    for sid in sorted(rows):
        old, status = there.get(sid), status_of[sid]
        if status != "unchanged":
            src = local / SESSIONS / sid
            dst = join(url, SESSIONS, sid)
            if old is not None:
                fs.rm(dst, recursive=True)
            files = [Path(d) / f for d, _, fs_ in os.walk(src) for f in fs_]
            fs.put([str(f) for f in files], [join(dst, f.relative_to(src).as_posix()) for f in files])
        merged[sid] = rows[sid]
        counts[status] += 1
        if on_session:
            on_session(sid, status)
    fs.pipe_file(join(url, SESSIONS, "zarr.json"), (local / SESSIONS / "zarr.json").read_bytes())
    fs.pipe_file(join(url, MANIFEST), manifest_text(merged).encode())
    fs.pipe_file(join(url, "zarr.json"), (local / "zarr.json").read_bytes())  # last: the corpus is complete
    return counts
