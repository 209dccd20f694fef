"""Errors that say where the problem is: which file, which session, which field.

Every failure a user can cause with bad input is a `CorpusError` (or a subclass), so the CLI can
print one clear line and keep going with the next file.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class CorpusError(Exception):
    """A problem with a source file or a corpus, located by file, session and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        session: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.session = session
        self.field = field

    def __reduce__(self):
        # keep the location when the error crosses a process boundary (worker pools pickle it)
        return (_rebuild, (type(self), self.message, self.file, self.session, self.field))

    def located(self, *, file: str | None = None, session: str | None = None) -> "CorpusError":
        """Fill in the location if the raiser did not know it (returns self for `raise ... from`)."""
        if self.file is None:
            self.file = file
        if self.session is None:
            self.session = session
        return self

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(f"file {self.file}")
        if self.session:
            where.append(f"session {self.session}")
        if self.field:
            where.append(f"field {self.field}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return prefix + self.message


def find_corpus_error(e: BaseException | None, depth: int = 12) -> "CorpusError | None":
    """The CorpusError behind an error that crossed processes: Ray wraps a worker's or an actor's
    exception (`cause`, `__cause__`, Ray Train's per-rank `worker_failures`), and only the located
    error inside says which file, session and field to look at."""
    seen: set[int] = set()
    todo = [e]
    while todo and depth > 0:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        depth -= 1
        if isinstance(x, CorpusError):
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
        failures = getattr(x, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
    return None


@contextmanager
def located() -> Iterator[None]:
    """Raise an error that crossed processes as the CorpusError inside it, when there is one (a data
    error a data actor sent in its batch's place is raised as it is; one that reached Ray some other
    way comes wrapped)."""
    try:
        yield
    except CorpusError:
        raise
    except Exception as e:
        inner = find_corpus_error(e)
        if inner is None:
            raise
        raise inner from e


def _rebuild(cls, message, file, session, field):
    return cls(message, file=file, session=session, field=field)


class InvalidSession(CorpusError):
    """The data of a session breaks an invariant (unsorted times, NaN behaviour, ...)."""


class DuplicateSession(CorpusError):
    """A session id already in the corpus, from another source, without `--replace`."""


class UnreadableSource(CorpusError):
    """A source file that cannot be opened or parsed (missing, truncated, not the format)."""


class UnknownLayout(CorpusError):
    """A readable file whose content matches none of the layouts popscale knows."""


class ConfigError(ValueError):
    """A configuration that cannot be used as given (unknown key, bad value, unreadable file): the
    message names the key or the file. The CLI reports it as a usage error (exit status 2)."""
