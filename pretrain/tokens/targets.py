"""Per-session target statistics: each behaviour of each session is learned on a common scale.

Real corpora mix units, rigs and labs (hand velocity in m/s next to cm/s): a fixed scale per
behaviour name makes some sessions' loss vanish. So every (session, behaviour) a readout decodes
is centred on the mean of its own train split (or of the labelled part, when adapting) and
divided by one scale per behaviour, its RMS deviation over all columns, so that the target's RMS
is `data.target_rms`. The numbers are computed once on the driver and carried by the plan, every
checkpoint and the registered model; predictions go back to the session's units with them. A
scale fixed in the config (`data.target_scale`) still wins for its behaviour.

Why one scale per behaviour and not one per column: a vector behaviour (velocity, position)
keeps its direction, so a unit tuned to a direction means the same thing in every session. Why
an RMS of 0.5 and not 1: the model's outputs start near zero and have to grow to the targets.
Measured on the demo corpus, in-process, 150 steps of the demo recipe (bench/RESULTS.md):
valid R² 0.29 per-column z-scores, 0.41 one scale at RMS 1, 0.54 one scale at RMS 0.5; the old
fixed /20 (RMS about 0.5 there) gave 0.54.
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
    std: float  # RMS over columns of the per-column standard deviations


def behaviour_stats(times: np.ndarray, values: np.ndarray, within: np.ndarray, *, session: str, behaviour: str,
                    file: str | None = None) -> TargetStats:
    """Column means and the pooled standard deviation of the samples inside `within`. A
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
    return TargetStats(mean.tolist(), float(np.sqrt((std**2).mean())))


def check_classes(values: np.ndarray, n_classes: int, *, session: str, behaviour: str, file: str | None = None
                  ) -> None:
    """A categorical behaviour must hold whole class ids in [0, n_classes) (NaN: unlabelled)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    bad = v[(v != np.round(v)) | (v < 0) | (v >= n_classes)]
    if len(bad):
        raise CorpusError(f"{len(bad)} value(s) are not class ids in [0, {n_classes}) (e.g. {bad[:3].tolist()}): "
                          "a categorical readout needs whole class ids (set its dims to the number of classes)",
                          file=file, session=session, field=f"behaviour/{behaviour}")


def target_stats(corpus: Corpus, sessions: list[str], readouts, fixed: dict[str, float],
                 split: str = "train", within: dict[str, np.ndarray] | None = None,
                 not_decoded: dict[str, list[str]] | None = None) -> dict[str, dict[str, TargetStats]]:
    """session -> behaviour -> stats over the `split` intervals (or the session's `within`
    intervals: the labelled part, when adapting), for the behaviour each readout decodes in each
    session (`readouts`: tokenizer `Readout`s), except those with a fixed scale."""
    out: dict[str, dict[str, TargetStats]] = {}
    for sid in sessions:
        r = corpus.session(sid)
        for ro in readouts:
            b = ro.pick(r.behaviour_names, (not_decoded or {}).get(sid, ()))
            if b is None or b in fixed:
                continue
            t, v = r.behaviour(b)
            kind = getattr(ro, "kind", "continuous")
            if kind == "categorical":
                check_classes(v, ro.dims, session=sid, behaviour=b, file=str(corpus.root))
            if kind != "continuous":
                continue  # angles and class ids are learned as they are
            idx = ro.select(list(r.attrs["behaviour"][b]["columns"]), sid, b) if hasattr(ro, "select") else None
            if idx is not None:  # the columns the readout reads (x, y of a 3-D position)
                v = np.asarray(v).reshape(len(t), -1)[:, idx]
            rows = within[sid] if within and sid in within else r.intervals.get(split, iv.EMPTY)
            out.setdefault(sid, {})[b] = behaviour_stats(t, v, rows, session=sid, behaviour=b, file=str(corpus.root))
    return out
