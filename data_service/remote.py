"""Corpora, checkpoints and run state on shared storage: a local path or an fsspec URL
(s3://bucket/prefix on AWS or any S3-compatible store; gs://, az://, ... where their fsspec
package is installed).

A URL corpus is read in place with ranged GETs: a shard's index once, then only the inner chunks
a window needs, decoded into the process's bounded chunk cache (shards.CACHE,
POPSCALE_CHUNK_CACHE_MB). Writing to an object store is push.py's job.

Endpoints and credentials come from the standard environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) or the node's role; nothing here
prints them.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

LOCAL_SCHEMES = ("", "file", "local")


# scheme://user:PASSWORD@host, and ?token=... style query parameters
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^/\s]*@")
_SECRET_QUERY = re.compile(r"(?P<head>[?&](?:[A-Za-z0-9_.-]*(?:password|passwd|secret|token|signature|credential)"
                           r"[A-Za-z0-9_.-]*|sig|key|api_key)=)[^&#\s]+", re.IGNORECASE)


def redact(text) -> str:
    """`text` (a URI, or a message with URIs in it) as it may be printed or logged: the password of
    every `scheme://user:password@host` and the values of query parameters that carry secrets
    (token, password, secret, signature, sig, key) replaced by `***`. Nothing else changes."""
    s = _USERINFO.sub(lambda m: f"{m['head']}:***@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m['head']}***", s)


def is_url(p) -> bool:
    """True for a remote fsspec URL (s3://...), False for a local path (or a file:// URL)."""
    s = str(p)
    return "://" in s and urlparse(s).scheme not in LOCAL_SCHEMES


def as_path(p):
    """A path object with `/`, `exists()` and `read_text()`: pathlib for local paths, a UPath for URLs."""
    if not isinstance(p, str):
        return p
    if is_url(p):
        # deferred: importing upath only when used keeps start-up light
        from upath import UPath

        return UPath(p)
    return Path(p[len("file://"):] if p.startswith("file://") else p)


@lru_cache(maxsize=None)
def _fs(protocol: str):
    # deferred: importing fsspec only when used keeps start-up light
    import fsspec

    return fsspec.filesystem(protocol)


def filesystem(url: str):
    """The process's fsspec filesystem for a URL's scheme (one client, shared)."""
    return _fs(urlparse(str(url)).scheme)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(as_path(base).joinpath(*parts))


def resolve(p: str) -> str:
    """A location every worker can use: URLs as they are, local paths made absolute."""
    return str(p) if is_url(p) else str(as_path(str(p)).resolve())


def exists(p: str) -> bool:
    return filesystem(p).exists(str(p)) if is_url(p) else as_path(str(p)).exists()


def listdir(d: str) -> list[str]:
    """The names directly under a local directory or a URL prefix, sorted; [] if there is none."""
    if is_url(d):
        try:
            return sorted(str(x).rstrip("/").rsplit("/", 1)[-1] for x in filesystem(d).ls(str(d), detail=False))
        except FileNotFoundError:
            return []
    path = as_path(str(d))
    return sorted(x.name for x in path.iterdir()) if path.is_dir() else []


def read_text(p: str) -> str:
    return filesystem(p).cat_file(str(p)).decode() if is_url(p) else as_path(str(p)).read_text()


def write_text(p: str, text: str) -> None:
    """Write a small file whole: one PUT on an object store (atomic there), tmp + rename locally."""
    if is_url(p):
        filesystem(p).pipe_file(str(p), text.encode())
        return
    path = as_path(str(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pyarrow_filesystem(url: str):
    """The filesystem Ray Train writes checkpoints with (None: let Ray pick, for local paths).
    For s3:// it is pyarrow's native S3 client, pointed at AWS_ENDPOINT_URL when that is set (pyarrow
    does not read it itself); other schemes go through their fsspec filesystem."""
    if not is_url(url):
        return None
    # deferred: importing pyarrow only when used keeps start-up light
    import pyarrow.fs as pafs

    scheme = urlparse(url).scheme
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw = {}
        if endpoint:
            e = urlparse(endpoint)
            kw = {"endpoint_override": e.netloc or e.path, "scheme": e.scheme or "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        return pafs.S3FileSystem(**kw)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem(url)))


def storage_arg(url: str) -> str:
    """A URL as a pyarrow filesystem expects its paths (bucket/key, no scheme)."""
    return url.split("://", 1)[1] if is_url(url) else url
