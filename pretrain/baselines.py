"""Per-session baselines a lab would use, in the same harness as the model: same splits, same
label budget (labels.py), same metric (R² on the samples inside the split and the session's
`eval` intervals, averaged over output dims), hyper-parameters chosen on the valid split only.

- `ridge`: the Wiener filter. Square-rooted spike counts in bins of the session's timing
  resolution (binned recordings) or 50 ms, for the bin holding each behaviour sample and a
  history of bins before it, standardised, ridge-regressed onto the behaviour. History length
  and ridge strength are tuned on valid.
- `gru`: a one-layer GRU over the same binned counts (its state read out at the bin holding each
  sample), trained with Adam on stretches of the labelled part, early-stopped on valid; hidden
  size tuned on valid.

Spikes are features, not labels: a sample's history may reach before its labelled stretch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from data_service import intervals as iv
from data_service.errors import CorpusError
from data_service.reader import SessionReader

from .evaluate import r2_score
from .labels import LabelBudget, labelled_intervals
from .tokenizer import DEFAULT_BEHAVIOURS

METHODS = ("ridge", "gru")


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
    raise CorpusError(f"no behaviour a readout decodes ({DEFAULT_BEHAVIOURS}; the session has {names}); "
                      "name one with --behaviour", session=reader.session_id, field="behaviour")


def _data(reader: SessionReader, behaviour: str, budget: LabelBudget, seed: int, window_s: float,
          column: str | None = None, kind: str = "continuous") -> _Data:
    t, v = reader.behaviour(behaviour)
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(v, dtype=np.float64).reshape(len(t), -1)
    if column is not None:
        names = list(reader.attrs["behaviour"][behaviour]["columns"])
        if column not in names:
            raise CorpusError(f"no column {column!r} (it has {names})", session=reader.session_id,
                              field=f"behaviour/{behaviour}")
        y = y[:, names.index(column):names.index(column) + 1]
    if kind == "angular":  # scored as the model's angular readout is: R2 on (cos, sin)
        y = np.concatenate([np.cos(y[:, :1]), np.sin(y[:, :1])], axis=1)
    finite = np.isfinite(y).all(1)
    labelled = labelled_intervals(reader, budget, seed, window_s, behaviours=[behaviour])
    ev = reader.intervals.get("eval")

    def scored(split: str) -> np.ndarray:
        rows = iv.normalize(reader.intervals.get(split, iv.EMPTY))
        return iv.contains(iv.intersect(rows, ev) if ev is not None else rows, t) & finite

    su, st = reader.spikes()[1], reader.spikes()[0]
    order = np.argsort(su, kind="stable")
    bounds = np.searchsorted(su[order], np.arange(len(reader.unit_ids) + 1))
    spikes = [np.sort(st[order[bounds[u]:bounds[u + 1]]]) for u in range(len(reader.unit_ids))]
    res = reader.attrs.get("timing_resolution_s")
    return _Data(t, y, float(res) if res else 0.05, spikes, iv.contains(labelled, t) & finite, scored("valid"),
                 scored("test"), iv.total(labelled))


def lagged_counts(spikes: list[np.ndarray], times: np.ndarray, bin_s: float, history: int) -> np.ndarray:
    """(n, units * (history + 1)) float32: sqrt spike counts of the bin holding each time and of
    the `history` bins before it."""
    edges = times[:, None] + bin_s * np.arange(-history, 2)[None, :]  # bin k: [t + (k-1) b, t + k b), k = -h+1..1
    out = np.empty((len(times), len(spikes), history + 1), dtype=np.float32)
    for u, s in enumerate(spikes):
        c = np.searchsorted(s, edges, side="left")
        out[:, u] = np.sqrt(np.diff(c, axis=1))
    return out.reshape(len(times), -1)


def _column(behaviour: str | None) -> str | None:
    return behaviour.split("[", 1)[1].rstrip("]") if behaviour and "[" in behaviour else None


def ridge(reader: SessionReader, budget: LabelBudget, seed: int = 0, window_s: float = 1.0,
          behaviour: str | None = None, kind: str = "continuous", histories_s=(0.1, 0.25, 0.5),
          alphas=tuple(10.0 ** np.arange(0, 7))) -> BaselineResult:
    t0 = time.time()
    b = pick_behaviour(reader, behaviour)
    d = _data(reader, b, budget, seed, window_s, _column(behaviour), kind)
    best = (-np.inf, None, None, None)
    for h_s in histories_s:
        h = max(1, int(round(h_s / d.bin_s)))
        x = lagged_counts(d.spikes, d.times, d.bin_s, h)
        xt, yt = x[d.train].astype(np.float64), d.y[d.train]
        mu, sd = xt.mean(0), xt.std(0) + 1e-6
        ym = yt.mean(0)
        z = (xt - mu) / sd
        evals, evecs = np.linalg.eigh(z.T @ z)
        proj = evecs.T @ (z.T @ (yt - ym))
        zv = (x[d.valid] - mu) / sd
        for a in alphas:
            w = evecs @ (proj / (evals + a)[:, None])
            r = r2_score(d.y[d.valid], zv @ w + ym)
            if r > best[0]:
                best = (r, {"history_s": h * d.bin_s, "alpha": float(a), "bin_s": d.bin_s}, (mu, sd, ym, w), h)
    r_valid, params, (mu, sd, ym, w), h = best
    x = lagged_counts(d.spikes, d.times[d.test], d.bin_s, h)
    test = r2_score(d.y[d.test], (x - mu) / sd @ w + ym)
    return BaselineResult("ridge", reader.session_id, b, float(test), float(r_valid), params, d.labelled_s,
                          time.time() - t0)


def _binned(d: _Data, rows: np.ndarray, burn_in_s: float):
    """Per stretch: (sqrt counts (T, units), index of the bin holding each of its samples, sample mask)."""
    out = []
    for a, b in iv.normalize(rows):
        start = a - burn_in_s
        edges = np.arange(start, b + d.bin_s, d.bin_s)
        counts = np.stack([np.diff(np.searchsorted(s, edges)) for s in d.spikes], axis=1)
        inside = (d.times >= a) & (d.times < b)
        k = np.clip(((d.times[inside] - start) // d.bin_s).astype(np.int64), 0, len(edges) - 2)
        out.append((np.sqrt(counts).astype(np.float32), k, inside))
    return out


def gru(reader: SessionReader, budget: LabelBudget, seed: int = 0, window_s: float = 1.0,
        behaviour: str | None = None, kind: str = "continuous", hiddens=(64, 128), steps: int = 600,
        chunk_s: float = 5.0) -> BaselineResult:
    import torch

    t0 = time.time()
    b = pick_behaviour(reader, behaviour)
    d = _data(reader, b, budget, seed, window_s, _column(behaviour), kind)
    labelled = labelled_intervals(reader, budget, seed, window_s, behaviours=[b])
    ym, ys = d.y[d.train].mean(0), d.y[d.train].std(0) + 1e-9
    train = [(x, k, m) for x, k, m in _binned(d, labelled, 1.0) if m.any()]
    split_rows = {s: iv.normalize(reader.intervals.get(s, iv.EMPTY)) for s in ("valid", "test")}
    held = {s: _binned(d, rows, 1.0) for s, rows in split_rows.items()}
    mask = {"valid": d.valid, "test": d.test}
    n_units, n_out = len(d.spikes), d.y.shape[1]
    chunk = max(4, int(round(chunk_s / d.bin_s)))
    best = (-np.inf, None, None)
    for hidden in hiddens:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = torch.nn.GRU(n_units, hidden, batch_first=True)
        head = torch.nn.Linear(hidden, n_out)
        params = list(net.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=3e-3, weight_decay=1e-5)

        def predict(stretches, m_all):
            pred = np.full(d.y.shape, np.nan)
            with torch.no_grad():
                for x, k, inside in stretches:
                    h, _ = net(torch.from_numpy(x)[None])
                    pred[np.flatnonzero(inside)] = head(h[0, torch.from_numpy(k)]).numpy() * ys + ym
            ok = m_all & np.isfinite(pred).all(1)
            return r2_score(d.y[ok], pred[ok]) if ok.any() else float("nan")

        lengths = np.array([len(x) for x, _, _ in train], dtype=np.float64)
        best_h, state_h = -np.inf, None
        for step in range(steps):
            i = int(torch.multinomial(torch.from_numpy(lengths), 1, generator=g))
            x, k, inside = train[i]
            s0 = int(torch.randint(0, max(1, len(x) - chunk), (1,), generator=g))
            seg = torch.from_numpy(x[s0:s0 + chunk])[None]
            idx = np.flatnonzero(inside)
            sel = (k >= s0) & (k < s0 + chunk) & d.train[idx]
            if not sel.any():
                continue
            h, _ = net(seg)
            out = head(h[0, torch.from_numpy(k[sel] - s0)])
            target = torch.from_numpy(((d.y[idx[sel]] - ym) / ys).astype(np.float32))
            loss = torch.nn.functional.mse_loss(out, target)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if (step + 1) % 100 == 0 or step == steps - 1:
                r = predict(held["valid"], mask["valid"])
                if r > best_h:
                    best_h, state_h = r, ([p.detach().clone() for p in params], step + 1)
        with torch.no_grad():
            for p, s in zip(params, state_h[0]):
                p.copy_(s)
        if best_h > best[0]:
            best = (best_h, {"hidden": hidden, "steps": state_h[1], "bin_s": d.bin_s},
                    predict(held["test"], mask["test"]))
    r_valid, params, test = best
    return BaselineResult("gru", reader.session_id, b, float(test), float(r_valid), params, d.labelled_s,
                          time.time() - t0)


def run_baseline(method: str, reader: SessionReader, budget: LabelBudget, seed: int = 0, window_s: float = 1.0,
                 behaviour: str | None = None, kind: str = "continuous") -> BaselineResult:
    """`behaviour` may name one column (`compass_direction[ry]`); `kind` continuous | angular."""
    if kind not in ("continuous", "angular"):
        from data_service.errors import ConfigError

        raise ConfigError(f"--kind {kind!r}: the baselines decode continuous or angular behaviours")
    if method == "ridge":
        return ridge(reader, budget, seed, window_s, behaviour, kind)
    if method == "gru":
        return gru(reader, budget, seed, window_s, behaviour, kind)
    from data_service.errors import ConfigError

    raise ConfigError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
