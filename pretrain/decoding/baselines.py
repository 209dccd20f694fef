"""Per-session baselines a lab would use, in the same harness as the model: same splits, same
label budget (labels.py), same metric (R² on the samples inside the split and the session's
`eval` intervals, averaged over output dims, with a 95 % bootstrap interval over test trials or
blocks), hyper-parameters chosen on the valid split only; test is scored once, at the end.

Both decode from square-rooted spike counts in bins of the session's timing resolution (binned
recordings) or 50 ms, as Glaser et al. (eNeuro 2020, "Machine learning for neural decoding") set
their decoders up: for each behaviour sample, the bin holding it and `history` bins before it
(causal), plus `after` bins after it (non-causal). Bins are laid from each sample's own time
(`lagged_counts`), so a sample on a bin edge of a binned recording reads exactly its own bin.

- `ridge` (the Wiener filter): the lagged counts, standardised, ridge-regressed onto the
  behaviour; history (up to 1 s) and ridge strength tuned on valid.
- `gru`: Glaser et al.'s recurrent decoder: a one-layer GRU run over the same bins in time order,
  its state after the sample's own bin read out linearly; trained with Adam on the labelled
  samples (inputs standardised, targets z-scored), hidden size and history from a grid that holds
  theirs (400 units, 700 ms of history for M1), the number of epochs by early stopping on valid.

`causal=False` gives the non-causal variants: bins after each sample too (`after_s`); the GRU is
then bidirectional and read out at the sample's bin (a one-way GRU read out after the future
bins was measured worse than the causal one on m1_stevenson: 0.881 vs 0.915 test R²). POYO's
stitched 1 s windows see about half a window on either side of a sample, so the non-causal
variants are its like-for-like comparison; the causal ones are what a closed-loop BCI could run.
Spikes are features, not labels: a sample's history may reach before its labelled stretch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import cho_factor, cho_solve

from data_service import intervals as iv
from data_service.errors import ConfigError, CorpusError
from data_service.reader import SessionReader

from ..tokens.config import DEFAULT_BEHAVIOURS
from ..tokens.labels import LabelBudget, labelled_intervals
from .metrics import bootstrap_r2, r2_score, sample_groups

METHODS = ("ridge", "gru")
RIDGE_HISTORIES_S = (0.1, 0.25, 0.5, 0.7, 1.0)
RIDGE_ALPHAS = tuple(10.0 ** np.arange(0, 7))
GRU_HIDDENS = (128, 400)
GRU_HISTORIES_S = (0.35, 0.7, 1.0)
AFTER_S = 0.3  # the non-causal variants' bins after a sample (Glaser et al.: 6 x 50 ms for S1)


@dataclass
class BaselineResult:
    method: str
    session: str
    behaviour: str
    test_r2: float
    valid_r2: float
    params: dict = field(default_factory=dict)  # the hyper-parameters valid chose
    labelled_s: float = 0.0
    seconds: float = 0.0
    test_ci: tuple[float, float] = (float("nan"), float("nan"))  # 95 % bootstrap over trials / blocks
    valid_s: float = 0.0  # validation time the selection scored on (the whole valid split)
    causal: bool = True


@dataclass
class _Data:
    """A session's behaviour samples, their split, and the binning the features use."""

    times: np.ndarray
    y: np.ndarray
    bin_s: float
    spikes: list[np.ndarray]  # per unit, sorted
    train: np.ndarray  # masks over samples
    valid: np.ndarray
    test: np.ndarray
    labelled_s: float
    test_groups: np.ndarray  # bootstrap groups of the test samples
    valid_s: float


def pick_behaviour(reader: SessionReader, behaviour: str | None = None) -> str:
    names = reader.behaviour_names
    if behaviour:
        behaviour = behaviour.split("[", 1)[0]
        if behaviour not in names:
            raise CorpusError(f"no behaviour {behaviour!r} (the session has {names})", session=reader.session_id,
                              field=f"behaviour/{behaviour}")
        return behaviour
    for b in (x for xs in DEFAULT_BEHAVIOURS.values() for x in xs):
        if b in names:
            return b
    if len(names) == 1:  # a session with one behaviour (a rat's position): that one
        return names[0]
    raise CorpusError(f"no behaviour a readout decodes ({DEFAULT_BEHAVIOURS}; the session has {names}); "
                      "name one with --behaviour", session=reader.session_id, field="behaviour")


def _data(reader: SessionReader, behaviour: str, budget: LabelBudget, seed: int, window_s: float,
          column: str | None = None, kind: str = "continuous") -> _Data:
    t, v = reader.behaviour(behaviour)
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(v, dtype=np.float64).reshape(len(t), -1)
    if column is not None:  # one column (compass_direction[ry]) or several (position[x,y])
        names = list(reader.attrs["behaviour"][behaviour]["columns"])
        wanted = [c.strip() for c in column.split(",")]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise CorpusError(f"no column {missing[0]!r} (it has {names})", session=reader.session_id,
                              field=f"behaviour/{behaviour}")
        y = y[:, [names.index(c) for c in wanted]]
    if kind == "angular":  # scored as the model's angular readout is: R2 on (cos, sin)
        y = np.concatenate([np.cos(y[:, :1]), np.sin(y[:, :1])], axis=1)
    finite = np.isfinite(y).all(1)
    labelled = labelled_intervals(reader, budget, seed, window_s, behaviours=[behaviour])
    ev = reader.intervals.get("eval")

    def scored_rows(split: str) -> np.ndarray:
        rows = iv.normalize(reader.intervals.get(split, iv.EMPTY))
        return iv.intersect(rows, ev) if ev is not None else rows

    su, st = reader.spikes()[1], reader.spikes()[0]
    order = np.argsort(su, kind="stable")
    bounds = np.searchsorted(su[order], np.arange(len(reader.unit_ids) + 1))
    spikes = [np.sort(st[order[bounds[u]:bounds[u + 1]]]) for u in range(len(reader.unit_ids))]
    res = reader.attrs.get("timing_resolution_s")
    test_rows, valid_rows = scored_rows("test"), scored_rows("valid")
    test = iv.contains(test_rows, t) & finite
    return _Data(t, y, float(res) if res else 0.05, spikes, iv.contains(labelled, t) & finite,
                 iv.contains(valid_rows, t) & finite, test, iv.total(labelled),
                 sample_groups(t[test], test_rows, reader.intervals.get("trials")), iv.total(valid_rows))


def lagged_counts(spikes: list[np.ndarray], times: np.ndarray, bin_s: float, history: int,
                  after: int = 0) -> np.ndarray:
    """(n, units, history + 1 + after) float32 sqrt spike counts, in time order: the `history`
    bins before the bin holding each time, that bin [t, t + bin_s), and `after` bins after it."""
    k = np.arange(-history, after + 2)
    edges = times[:, None] + bin_s * k[None, :]
    out = np.empty((len(times), len(spikes), history + 1 + after), dtype=np.float32)
    for u, s in enumerate(spikes):
        c = np.searchsorted(s, edges, side="left")
        out[:, u] = np.sqrt(np.diff(c, axis=1))
    return out


def _column(behaviour: str | None) -> str | None:
    return behaviour.split("[", 1)[1].rstrip("]") if behaviour and "[" in behaviour else None


def _bins(seconds: float, bin_s: float) -> int:
    return max(1, int(round(seconds / bin_s)))


def _thinned(times: np.ndarray, rows: np.ndarray, bin_s: float) -> np.ndarray:
    """Training rows at most about one per bin: behaviour sampled faster than the bins (position
    at 30-120 Hz) adds near-copies of each sequence and costs epochs, not information."""
    dt = float(np.median(np.diff(times))) if len(times) > 1 else bin_s
    stride = max(1, int(round(bin_s / dt))) if dt > 0 else 1
    return rows[::stride]


def _result(method: str, reader: SessionReader, b: str, d: _Data, pred_test: np.ndarray, r_valid: float,
            params: dict, t0: float, causal: bool) -> BaselineResult:
    y = d.y[d.test]
    return BaselineResult(method, reader.session_id, b, r2_score(y, pred_test), float(r_valid), params, d.labelled_s,
                          time.time() - t0, bootstrap_r2(y, pred_test, d.test_groups), d.valid_s, causal)


def ridge(reader: SessionReader, budget: LabelBudget, seed: int = 0, window_s: float = 1.0,
          behaviour: str | None = None, kind: str = "continuous", causal: bool = True,
          histories_s=RIDGE_HISTORIES_S, alphas=RIDGE_ALPHAS) -> BaselineResult:
    t0 = time.time()
    b = pick_behaviour(reader, behaviour)
    d = _data(reader, b, budget, seed, window_s, _column(behaviour), kind)
    after = 0 if causal else _bins(AFTER_S, d.bin_s)
    best = (-np.inf, None, None, None)
    for h_s in histories_s:
        h = _bins(h_s, d.bin_s)
        x = lagged_counts(d.spikes, d.times, d.bin_s, h, after).reshape(len(d.times), -1)
        xt, yt = x[d.train].astype(np.float64), d.y[d.train]
        mu, sd = xt.mean(0), xt.std(0) + 1e-6
        ym = yt.mean(0)
        z = (xt - mu) / sd
        gram, rhs = z.T @ z, z.T @ (yt - ym)
        zv = (x[d.valid] - mu) / sd
        for a in alphas:  # a Cholesky solve per penalty: ~4x cheaper than one eigendecomposition at these sizes
            w = cho_solve(cho_factor(gram + a * np.eye(len(gram)), check_finite=False), rhs, check_finite=False)
            r = r2_score(d.y[d.valid], zv @ w + ym)
            if r > best[0]:
                best = (r, {"history_s": h * d.bin_s, "after_s": after * d.bin_s, "alpha": float(a), "bin_s": d.bin_s},
                        (mu, sd, ym, w), h)
    r_valid, params, (mu, sd, ym, w), h = best
    x = lagged_counts(d.spikes, d.times[d.test], d.bin_s, h, after).reshape(int(d.test.sum()), -1)
    return _result("ridge", reader, b, d, (x - mu) / sd @ w + ym, r_valid, params, t0, causal)


def gru(reader: SessionReader, budget: LabelBudget, seed: int = 0, window_s: float = 1.0,
        behaviour: str | None = None, kind: str = "continuous", causal: bool = True, hiddens=GRU_HIDDENS,
        histories_s=GRU_HISTORIES_S, max_epochs: int = 15, patience: int = 3, batch: int = 128,
        lr: float = 1e-3) -> BaselineResult:

    t0 = time.time()
    b = pick_behaviour(reader, behaviour)
    d = _data(reader, b, budget, seed, window_s, _column(behaviour), kind)
    after = 0 if causal else _bins(AFTER_S, d.bin_s)
    ym, ys = d.y[d.train].mean(0), d.y[d.train].std(0) + 1e-9
    best = (-np.inf, None, None)
    for h_s in histories_s:
        h = _bins(h_s, d.bin_s)
        x = lagged_counts(d.spikes, d.times, d.bin_s, h, after).transpose(0, 2, 1)  # (n, time, units)
        mu, sd = x[d.train].mean((0, 1)), x[d.train].std((0, 1)) + 1e-6
        x = torch.from_numpy(((x - mu) / sd).astype(np.float32))
        rows = _thinned(d.times, np.flatnonzero(d.train), d.bin_s)
        xt, yt = x[rows], torch.from_numpy(((d.y[rows] - ym) / ys).astype(np.float32))
        xv = x[d.valid]
        for hidden in hiddens:
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            # causal: the state after the sample's own bin; non-causal: a bidirectional GRU read out at
            # the sample's bin (past and present from one direction, future and present from the other)
            net = torch.nn.GRU(x.shape[2], hidden, batch_first=True, bidirectional=not causal)
            head = torch.nn.Linear(hidden * (1 if causal else 2), d.y.shape[1])
            params = list(net.parameters()) + list(head.parameters())
            opt = torch.optim.Adam(params, lr=lr)

            def forward(inputs: torch.Tensor) -> torch.Tensor:
                return head(net(inputs)[0][:, h])

            def predict(inputs: torch.Tensor) -> np.ndarray:
                with torch.no_grad():
                    out = [forward(inputs[i:i + 2048]) for i in range(0, len(inputs), 2048)]
                return torch.cat(out).numpy() * ys + ym

            best_h, state, since = -np.inf, None, 0
            for epoch in range(1, max_epochs + 1):
                for idx in torch.randperm(len(xt), generator=g).split(batch):
                    loss = torch.nn.functional.mse_loss(forward(xt[idx]), yt[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                r = r2_score(d.y[d.valid], predict(xv))
                if r > best_h:
                    best_h, state, since = r, ([p.detach().clone() for p in params], epoch), 0
                else:
                    since += 1
                    if since >= patience:
                        break
            if best_h > best[0]:
                with torch.no_grad():
                    for p, s in zip(params, state[0]):
                        p.copy_(s)
                best = (best_h, {"hidden": hidden, "history_s": h * d.bin_s, "after_s": after * d.bin_s,
                                 "epochs": state[1], "bin_s": d.bin_s}, predict(x[d.test]))
    r_valid, params, pred = best
    return _result("gru", reader, b, d, pred, r_valid, params, t0, causal)


def run_baseline(method: str, reader: SessionReader, budget: LabelBudget, seed: int = 0, window_s: float = 1.0,
                 behaviour: str | None = None, kind: str = "continuous", causal: bool = True, **grid) -> BaselineResult:
    """`behaviour` may name its columns (`compass_direction[ry]`, `position[x,y]`); `kind` continuous | angular;
    `grid`: the method's own settings (a smaller grid in tests)."""
    if kind not in ("continuous", "angular"):
        raise ConfigError(f"--kind {kind!r}: the baselines decode continuous or angular behaviours")
    if method == "ridge":
        return ridge(reader, budget, seed, window_s, behaviour, kind, causal, **grid)
    if method == "gru":
        return gru(reader, budget, seed, window_s, behaviour, kind, causal, **grid)
    raise ConfigError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
