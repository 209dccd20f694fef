"""Label budgets: which part of a session's train split an adaptation may learn from.

A budget is a fraction of the session's labelled train time (`10%`) or a duration (`2m`,
`90s`); a bare number is refused, since "10" could be either. The labelled part is drawn from
the train split only (never valid or test), as whole trials when the session has trials inside
its train split, else as blocks of time, in a seeded order per (seed, session): the same budget
and seed always give the same labels, and a larger budget holds every trial of a smaller one.

    budget = LabelBudget.parse("10%")
    rows = labelled_intervals(reader, budget, seed=0, window_s=1.0)  # (n, 2) inside train
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from data_service import intervals as iv
from data_service.errors import ConfigError, CorpusError
from data_service.reader import SessionReader
from data_service.splits import sampled_support, session_seed

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|s|sec|m|min|h)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class LabelBudget:
    fraction: float | None = None  # of the labelled train time, in (0, 1]
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> "LabelBudget":
        m = _BUDGET.match(str(text))
        if not m:
            hint = " (a bare number is ambiguous: say 10% or 10s)" if re.fullmatch(r"\s*[\d.]+\s*", str(text)) else ""
            raise ConfigError(f"--labels {text!r}: expected a percentage (10%) or a duration (90s, 2m, 1h){hint}")
        value, unit = float(m.group(1)), m.group(2).lower()
        if value <= 0:
            raise ConfigError(f"--labels {text!r}: the budget must be more than 0")
        if unit == "%":
            if value > 100:
                raise ConfigError(f"--labels {text!r}: more than 100% of the train split")
            return cls(fraction=value / 100)
        return cls(seconds=value * _UNIT_S[unit])

    @property
    def everything(self) -> bool:
        return self.fraction == 1.0

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else f"{self.seconds:g}s"


def labelled_train(reader: SessionReader, behaviours: list[str] | None = None) -> np.ndarray:
    """The session's train split where `behaviours` (those it has; default: all) were sampled: the
    labelled train time a budget is a fraction of (a recording with sleep and no behaviour during
    it has less labelled time than train time)."""
    train = iv.normalize(reader.intervals.get("train", iv.EMPTY))
    names = [b for b in (reader.behaviour_names if behaviours is None else behaviours) if b in reader.behaviour_names]
    if not names:
        return train
    series = [reader.behaviour(b) for b in names]
    return iv.intersect(train, sampled_support([t for t, _ in series], reader.domain, values=[v for _, v in series]))


def label_units(reader: SessionReader, window_s: float, block_s: float | None = None,
                train: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """The pieces a budget is drawn in: the session's trials that lie wholly inside its (labelled)
    train split (when there are at least 3 and they are typically as long as a window), else that
    split cut into blocks of `block_s` (default: 10 windows)."""
    train = iv.normalize(reader.intervals.get("train", iv.EMPTY)) if train is None else train
    trials = iv.as_intervals(reader.intervals.get("trials", iv.EMPTY))
    if len(trials):
        trials = trials[iv.inside_mask(trials, train)]
    if len(trials) >= 3 and np.median(trials[:, 1] - trials[:, 0]) >= window_s:
        return trials[np.argsort(trials[:, 0], kind="stable")], "trials"
    block = block_s or 10 * window_s
    rows = []
    for a, b in train:
        n = max(1, int(np.floor((b - a) / block + 1e-9)))
        edges = np.linspace(a, b, n + 1)
        rows.extend(zip(edges[:-1], edges[1:]))
    return iv.as_intervals(rows), "blocks"


def labelled_intervals(reader: SessionReader, budget: LabelBudget, seed: int, window_s: float,
                       file: str | None = None, behaviours: list[str] | None = None) -> np.ndarray:
    """The labelled part of the session's train split under `budget` (normalised intervals), within
    where `behaviours` (default: every behaviour of the session) were sampled."""
    sid = reader.session_id
    train = labelled_train(reader, behaviours)
    where = dict(file=file, session=sid, field="intervals/train")
    if not len(train):
        raise CorpusError("the session has no labelled train split to draw labels from", **where)
    if budget.everything:
        return train
    units, kind = label_units(reader, window_s, train=train)
    total = iv.total(train)
    want = budget.fraction * total if budget.fraction is not None else budget.seconds
    if want > total + 1e-9:
        raise CorpusError(f"a label budget of {budget} is more than the session's train split "
                          f"({total:.0f} s); ask for at most {total:.0f}s or 100%", **where)
    order = np.random.default_rng(session_seed(seed, sid) % (1 << 63)).permutation(len(units))
    lengths = units[order, 1] - units[order, 0]
    take = int(np.searchsorted(np.cumsum(lengths), want - 1e-9) + 1)  # the first pieces reaching the budget
    chosen = iv.normalize(units[order[:min(take, len(order))]])
    chosen = iv.intersect(chosen, train)
    if not (chosen[:, 1] - chosen[:, 0] >= window_s - 1e-9).any():
        raise CorpusError(f"a label budget of {budget} gives no stretch of labels as long as one window "
                          f"({window_s:g} s) in the session's {kind}; ask for more", **where)
    return chosen


def window_stretches(reader: SessionReader, labelled: np.ndarray, window_s: float,
                     behaviours: list[str] | None = None) -> np.ndarray:
    """Where training windows may be drawn for a labelled part: its intervals, with each gap between
    two of them closed when no behaviour sample lies in the gap and it is shorter than two windows
    (a recording paused between trials, as in a BCI session of sub-second trials laid end to end).
    A window may then span such a gap without any label outside the budget entering the loss; the
    labelled part itself (targets' statistics, the warm start) is unchanged."""
    rows = iv.normalize(labelled)
    if len(rows) < 2:
        return rows
    names = [b for b in (reader.behaviour_names if behaviours is None else behaviours) if b in reader.behaviour_names]
    times = (np.sort(np.concatenate([np.asarray(reader.behaviour(b)[0], dtype=np.float64) for b in names]))
             if names else np.zeros(0))
    gap_a, gap_b = rows[:-1, 1], rows[1:, 0]
    empty = np.searchsorted(times, gap_a, side="right") == np.searchsorted(times, gap_b, side="left")
    close = empty & (gap_b - gap_a < 2 * window_s)
    keep_start = np.concatenate([[True], ~close])
    keep_end = np.concatenate([~close, [True]])
    return np.stack([rows[keep_start, 0], rows[keep_end, 1]], axis=1)
