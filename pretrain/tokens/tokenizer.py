"""Windows from the corpus reader -> one packed batch, in the model's vocabularies.

- inputs: one token per spike (global unit index, time from the window start, type SPIKE), and
  for every unit of the session (after unit dropout, if any) a START token at 0 and an END token
  at the window's end, so silent units are seen too;
- latents: `latents_per_step` learned latents repeated every `latent_step`, at the step centres;
- outputs: one query per behaviour sample of each readout's behaviour, with its target on a
  common scale (centred on the session's own train-split mean and divided by one scale per
  behaviour, to an RMS of `target_rms`; or divided by a scale the config fixes for that behaviour;
  targets.py) and a loss weight: the product of
  the weights of the interval sets containing it (e.g. reach 5, hold 0.1).

The tokenizer maps unit and session ids into vocabularies through `VocabLookup`, a protocol that
the model's embeddings and the plan's frozen id maps both satisfy, so the data service builds
batches without a model. `pack` is the one way a batch is made: training, evaluation and the
registered model all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data_service import intervals as iv
from data_service.batch import WindowBatch, segment_counts
from data_service.reader import SessionReader, Window

from ..model.batch import END, SPIKE, START, PackedBatch
from .config import TokenizerConfig, VocabLookup

# names defined here before tokens/config.py held them: still importable from here
from .config import DEFAULT_BEHAVIOURS, DEFAULT_INTERVAL_WEIGHTS, Geometry, Readout  # noqa: F401, I001


@dataclass
class SessionLayout:
    """What the tokenizer needs to know about a session, computed once per session."""

    session_index: int
    unit_map: np.ndarray  # local unit index -> global vocabulary index
    # (readout index, behaviour, dims, shift, scale): target = (value - shift) / scale, per column
    outputs: list[tuple[int, str, int, np.ndarray, np.ndarray]]
    needs: tuple[list[str], list[str]] | None = None  # Tokenizer.needs, once computed


def _as_mask(keep: np.ndarray, n_units: int) -> np.ndarray:
    """Kept units as a boolean mask over the session's units (from local indices, or as given)."""
    keep = np.asarray(keep)
    if keep.dtype == np.bool_:
        return keep
    m = np.zeros(n_units, dtype=bool)
    m[keep.astype(np.int64, copy=False)] = True
    return m


class Tokenizer:
    def __init__(self, cfg: TokenizerConfig, unit_vocab: VocabLookup, session_vocab: VocabLookup) -> None:
        self.cfg = cfg
        self.unit_vocab, self.session_vocab = unit_vocab, session_vocab
        self.readout_names = [r.name for r in cfg.readouts]
        self.max_dim = max(r.dims for r in cfg.readouts)
        self._angular = {k for k, r in enumerate(cfg.readouts) if r.kind == "angular"}
        self._column: dict[tuple[str, int], list[int]] = {}  # (session, readout) -> the behaviour columns it reads
        g = cfg.geometry
        self.latent_index = np.tile(np.arange(g.latents_per_step, dtype=np.int64), g.n_steps)
        centres = (np.arange(g.n_steps) + 0.5) * g.latent_step
        self.latent_time = np.repeat(centres, g.latents_per_step).astype(np.float32)
        self._layouts: dict[str, SessionLayout] = {}

    def layout(self, reader: SessionReader) -> SessionLayout:
        p = self._layouts.get(reader.session_id)
        if p is None:
            outputs = []
            for k, ro in enumerate(self.cfg.readouts):
                b = ro.pick(reader.behaviour_names, self.cfg.not_decoded.get(reader.session_id, ()))
                if b is None:
                    continue
                names = list(reader.attrs["behaviour"][b]["columns"])
                idx = ro.select(names, reader.session_id, b)
                if idx is not None and (ro.column is not None or len(names) > 1):
                    self._column[(reader.session_id, k)] = idx
                cols = len(names) if idx is None or (ro.kind != "continuous" and ro.column is None) else len(idx)
                want = ro.dims if ro.kind == "continuous" else 1
                if cols != want:
                    hint = (f"; pick {ro.dims} of them with data.readout_columns ({ro.name}: "
                            f"{','.join(names[:ro.dims])})" if ro.kind == "continuous" and cols > want else "")
                    raise ValueError(f"session {reader.session_id}: behaviour {b} has {cols} columns, the "
                                     f"{ro.kind} readout {ro.name} takes {want}{hint}")
                dims = ro.dims if ro.kind == "angular" else cols
                outputs.append((k, b, dims, *self.cfg.normaliser(reader.session_id, b, dims, self.max_dim, ro.kind)))
            p = self._layouts[reader.session_id] = SessionLayout(
                session_index=int(self.session_vocab.lookup([reader.session_id])[0]),
                unit_map=self.unit_vocab.lookup(reader.unit_ids), outputs=outputs)
        return p

    def column(self, session: str, readout: int) -> list[int] | None:
        """The behaviour columns a readout reads in this session (after `layout`); None: all."""
        return self._column.get((session, readout))

    def decoding_layout(self, reader: SessionReader) -> SessionLayout:
        """The layout for decoding: every readout the model can express in this session's units, by
        the behaviour the session has or, for a session recorded without it, the behaviour the model
        learned it by (its target statistics or a fixed scale), so a recording without labels is
        decoded in its units too. Cached as the session's layout (use a tokenizer of its own)."""
        base = self.layout(reader)
        have = {o[0] for o in base.outputs}
        outputs = list(base.outputs)
        stats = self.cfg.target_stats.get(reader.session_id, {})
        for k, ro in enumerate(self.cfg.readouts):
            if k in have:
                continue
            b = next((x for x in ro.behaviours if x in stats), None) or next(
                (x for x in ro.behaviours if x in self.cfg.target_scale), None)
            if b is not None or not self.cfg.target_stats:
                b = b or (ro.behaviours[0] if ro.behaviours else ro.name)
                dims = 1 if ro.kind == "categorical" else ro.dims
                outputs.append((k, b, dims, *self.cfg.normaliser(reader.session_id, b, dims, self.max_dim, ro.kind)))
        p = self._layouts[reader.session_id] = SessionLayout(base.session_index, base.unit_map,
                                                            sorted(outputs, key=lambda o: o[0]))
        return p

    def needs(self, reader: SessionReader) -> tuple[list[str], list[str]]:
        """(behaviours, interval sets) a window of this session must carry to be tokenized
        (worked out once per layout: the data service asks for every window)."""
        p = self.layout(reader)
        if p.needs is None:
            p.needs = ([o[1] for o in p.outputs], list(self.cfg.interval_weights))
        return p.needs

    def __call__(self, w: Window, reader: SessionReader, keep_units: np.ndarray | None = None) -> PackedBatch:
        """One window as a batch of one; `keep_units` (local indices or a mask over the session's
        units) drops the other units' spikes and tokens."""
        return self.pack([(w, reader, keep_units)])

    def pack(self, items: Sequence[tuple[Window, SessionReader, np.ndarray | None]]) -> PackedBatch:
        """Tokenize and pack a batch of (window, reader, kept units): what joining the windows
        packed one by one gives. Kept units are None (all), local indices, or a boolean mask over
        the session's units."""
        return self.pack_batch(WindowBatch.of([w for w, _, _ in items]), [r for _, r, _ in items],
                               [k for _, _, k in items])

    def pack_batch(self, wb: WindowBatch, readers: Sequence[SessionReader],
                   keep: Sequence[np.ndarray | None]) -> PackedBatch:
        """`pack` for windows in batch form (data_service.batch), the data service's hot path: one
        concatenation or gather per field for the whole batch (numpy call overhead, not
        arithmetic, is its cost); only the output queries are gathered window by window."""
        B = len(wb)
        layouts = [self.layout(r) for r in readers]
        masks = None
        if any(k is not None for k in keep):
            masks = [None if k is None else _as_mask(k, len(p.unit_map)) for k, p in zip(keep, layouts)]
        out_t, out_y, out_win, out_r, scales, out_lens = [], [], [], [], [], []  # output queries, per readout
        for i, (p, reader, beh) in enumerate(zip(layouts, readers, wb.behaviour)):
            n_out = 0
            for readout, b, dims, shift, scale in p.outputs:
                s = beh[b]
                n = len(s.timestamps)
                out_t.append(s.timestamps)
                out_y.append(self._values(s.values, reader.session_id, readout, dims))
                out_win.append(i)
                out_r.append((readout, n))
                scales.append((shift, scale, n))
                n_out += n
            out_lens.append(n_out)
        durs = [e - s for s, e in zip(wb.t_starts, wb.t_ends)]
        unit_index, input_time, seg = self._input_tokens([p.unit_map for p in layouts], wb.spike_units,
                                                         wb.spike_counts, wb.spike_times, masks, durs)
        in_lens = seg.reshape(B, 3).sum(1)
        target, output_time, readouts = self._outputs(out_t, out_y, out_r, scales)
        return PackedBatch(
            unit_index=unit_index, input_time=input_time,
            token_type=np.repeat(np.tile(np.array([SPIKE, START, END], dtype=np.int64), B), seg),
            latent_index=np.tile(self.latent_index, B), latent_time=np.tile(self.latent_time, B),
            output_time=output_time, output_readout=readouts,
            output_session=np.repeat(np.asarray([p.session_index for p in layouts], dtype=np.int64), out_lens),
            target=target, weight=self._weights(wb, out_win, out_t, durs),
            input_lens=in_lens.tolist(), latent_lens=[len(self.latent_index)] * B, output_lens=out_lens,
            session_ids=list(wb.session_ids), t_starts=list(wb.t_starts),
        )

    def _values(self, y: np.ndarray, session: str, readout: int, dims: int) -> np.ndarray:
        """One window's values of one readout as the model learns them: the readout's columns, an
        angle as (cos, sin), padded to the widest readout."""
        col = self._column.get((session, readout))
        if col is not None:
            y = np.asarray(y)[:, col]
        if readout in self._angular:  # an angle is learned as (cos, sin)
            a = np.asarray(y, dtype=np.float64)[:, 0]
            y = np.stack([np.cos(a), np.sin(a)], axis=1)
        if dims != self.max_dim:
            y2 = np.zeros((len(y), self.max_dim), dtype=np.float64)
            y2[:, :dims] = y
            y = y2
        return y

    def _outputs(self, out_t: list[np.ndarray], out_y: list[np.ndarray], out_r: list[tuple[int, int]],
                 scales: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(target, output_time, readout) of a batch's output queries, concatenated over windows
        and readouts; targets normalised in float64 and rounded once, so they equal normalising
        each window on its own."""
        if not out_t:
            return np.zeros((0, self.max_dim), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        cat = np.concatenate
        rr, rn = np.asarray(out_r, dtype=np.int64).T
        sn = np.asarray([n for _, _, n in scales])
        shift = np.repeat(np.stack([s for s, _, _ in scales]), sn, axis=0)
        scale = np.repeat(np.stack([s for _, s, _ in scales]), sn, axis=0)
        target = ((cat(out_y, dtype=np.float64) - shift) / scale).astype(np.float32)
        return target, cat(out_t, dtype=np.float32), np.repeat(rr, rn)

    @staticmethod
    def _input_tokens(maps: list[np.ndarray], spike_units: np.ndarray, n_spk: np.ndarray, spike_times: np.ndarray,
                      masks: list[np.ndarray | None] | None, durs: list[float]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit_index, input_time, segment lengths) of a batch's input tokens: per window its
        kept spikes, then a START and an END token per kept unit. The spikes come concatenated
        (`n_spk` per window); unit dropout is applied to the whole batch at once (one gather over
        every window's spikes, offset into one concatenated unit map), then the arrays are cut per
        window: a few numpy calls a window instead of ten."""
        B = len(maps)
        cat = np.concatenate
        n_units = np.fromiter((len(m) for m in maps), dtype=np.int64, count=B)
        umap = cat(maps) if B else np.zeros(0, np.int64)
        t = spike_times
        # every spike's unit as a position in the concatenated map
        g = spike_units + np.repeat(np.cumsum(n_units) - n_units, n_spk)
        if masks is None:
            ks, nk, upos = n_spk, n_units, None
        else:
            kept = cat([np.ones(n, dtype=bool) if m is None else m for m, n in zip(masks, n_units.tolist())])
            hit = kept.take(g)
            sel = np.flatnonzero(hit)
            g, t = g.take(sel), t.take(sel)
            upos = np.flatnonzero(kept)
            ks, nk = segment_counts(sel, n_spk), segment_counts(upos, n_units)
        spike_ids = umap.take(g)
        unit_ids = umap if upos is None else umap.take(upos)
        ends = np.repeat(np.asarray(durs, dtype=np.float64), nk)
        zeros = np.zeros(int(nk.max()) if B else 0)
        cs, cu = np.cumsum(ks).tolist(), np.cumsum(nk).tolist()
        ids, times = [], []
        a = c = 0
        for i in range(B):
            b, d = cs[i], cu[i]
            u = unit_ids[c:d]
            ids += (spike_ids[a:b], u, u)
            times += (t[a:b], zeros[:d - c], ends[c:d])
            a, c = b, d
        seg = np.stack([ks, nk, nk], axis=1).reshape(-1).astype(np.int64)
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), seg
        return cat(ids), cat(times, dtype=np.float32), seg

    def _weights(self, wb: WindowBatch, win: list[int], times: list[np.ndarray], durs: list[float]) -> np.ndarray:
        """Loss weight per output time (float32, concatenated over windows and readouts; `win`:
        the window of each readout's times): the product of the weights of the interval sets
        holding it. One pass for the whole batch: the k-th readout's times and its window's rows
        are shifted by k * (longest window + 1) s, so windows cannot overlap, and each set is
        normalised and searched once."""
        n = np.fromiter((len(t) for t in times), dtype=np.int64, count=len(times))
        weight = np.ones(int(n.sum()), dtype=np.float32)
        if not len(weight) or not self.cfg.interval_weights:
            return weight
        shift = np.arange(len(win)) * (max(durs[i] for i in win) + 1.0)
        t = np.concatenate(times) + np.repeat(shift, n)
        ordered = bool((t[1:] >= t[:-1]).all())  # always, for times inside their windows
        w = np.asarray(win, dtype=np.int64)
        for name, wt in self.cfg.interval_weights.items():
            if name not in wb.intervals:
                continue
            rows, per_window = wb.intervals[name]
            m = per_window.take(w)  # rows of each readout's window
            if not m.any():
                continue
            first = (np.cumsum(per_window) - per_window).take(w)
            idx = np.arange(int(m.sum())) + np.repeat(first - (np.cumsum(m) - m), m)
            rows = iv.normalize(rows.take(idx, axis=0) + np.repeat(shift, m)[:, None])
            if ordered:  # each row's first and last time by two searches, ~3x cheaper than one search a time
                edges = np.bincount(t.searchsorted(rows[:, 0]), minlength=len(t) + 1)
                edges -= np.bincount(t.searchsorted(rows[:, 1]), minlength=len(t) + 1)
                weight[np.cumsum(edges[:-1]) > 0] *= wt
            else:
                k = np.searchsorted(rows[:, 0], t, side="right") - 1  # iv.contains, inlined
                weight[(k >= 0) & (t < rows[np.maximum(k, 0), 1])] *= wt
        return weight
