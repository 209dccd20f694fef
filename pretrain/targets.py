"""Per-session target statistics: each behaviour of each session is learned on a common scale.

Real corpora mix units, rigs and labs (hand velocity in m/s next to cm/s): a fixed scale per
behaviour name makes some sessions' loss vanish. So every (session, behaviour) a readout decodes
is z-scored per column with the mean and standard deviation of its own train split (or of the
labelled part, when adapting), computed once on the driver and carried by the plan, every
checkpoint and the registered model; predictions go back to the session's units with the same
numbers. A scale fixed in the config (`data.target_scale`) still wins for its behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_service import intervals as iv
from data_service.errors import CorpusError
from data_service.reader import Corpus


@dataclass
class TargetStats:
    mean: list[float]  # per column
    std: list[float]


def behaviour_stats(times: np.ndarray, values: np.ndarray, within: np.ndarray, *, session: str, behaviour: str,
                    file: str | None = None) -> TargetStats:
    """Column means and standard deviations of the samples inside `within` (intervals). A
    behaviour with no finite samples there, or a column that does not vary, cannot be scaled:
    refused, naming the session and the behaviour."""
    v = np.asarray(values, dtype=np.float64)
    v = v.reshape(len(v), -1)[iv.contains(iv.normalize(within), times)] if len(within) else v[:0].reshape(0, -1)
    where = dict(file=file, session=session, field=f"behaviour/{behaviour}")
    finite = np.isfinite(v)
    if (finite.sum(0) < 2).any():
        raise CorpusError("too few finite samples in the train split to set this behaviour's scale", **where)
    mean = np.array([c[f].mean() for c, f in zip(v.T, finite.T)])
    std = np.array([c[f].std() for c, f in zip(v.T, finite.T)])
    flat = ~(std > 1e-12 * np.maximum(np.abs(mean), 1.0))
    if flat.any():
        raise CorpusError(f"column(s) {np.flatnonzero(flat).tolist()} are constant in the train split "
                          f"(value {mean[flat].tolist()}): the behaviour has no scale to learn on", **where)
    return TargetStats(mean.tolist(), std.tolist())


def target_stats(corpus: Corpus, sessions: list[str], readouts, fixed: dict[str, float],
                 split: str = "train") -> dict[str, dict[str, TargetStats]]:
    """session -> behaviour -> stats over the `split` intervals, for the behaviour each readout
    decodes in each session (`readouts`: tokenizer `Readout`s), except those with a fixed scale."""
    out: dict[str, dict[str, TargetStats]] = {}
    for sid in sessions:
        r = corpus.session(sid)
        for ro in readouts:
            b = next((x for x in ro.behaviours if x in r.behaviour_names), None)
            if b is None or b in fixed:
                continue
            t, v = r.behaviour(b)
            out.setdefault(sid, {})[b] = behaviour_stats(t, v, r.intervals.get(split, iv.EMPTY), session=sid,
                                                         behaviour=b, file=str(corpus.root))
    return out
