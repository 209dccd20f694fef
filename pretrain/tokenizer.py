"""A window from the corpus reader -> one tokenized Sample, in the model's vocabulary.

- inputs: one token per spike (global unit index, time from the window start, type SPIKE), and
  for every unit of the session (after unit dropout, if any) a START token at 0 and an END token
  at the window's end, so silent units are seen too;
- latents: `latents_per_step` learned latents repeated every `latent_step`, at the step centres;
- outputs: one query per behaviour sample of each readout's behaviour, with its target (divided
  by a fixed per-behaviour scale) and a loss weight: the product of the weights of the interval
  sets containing it (e.g. reach 5, hold 0.1).

The tokenizer belongs to the model because it maps unit and session ids into the model's
vocabularies; the data service receives it as a callable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from data_service import intervals as iv
from data_service.reader import SessionReader, Window

from .batch import END, SPIKE, START, Sample

_NO_ROWS = np.zeros((0, 2))


@dataclass
class TokenizerConfig:
    window: float = 1.0
    latent_step: float = 0.125
    latents_per_step: int = 16
    # readout -> behaviours it decodes, first one present in a session wins
    readouts: dict[str, list[str]] = field(default_factory=lambda: {"velocity": ["hand_vel", "cursor_vel"]})
    target_scale: dict[str, float] = field(default_factory=dict)  # behaviour -> divisor (fixed z-scaling)
    interval_weights: dict[str, float] = field(default_factory=lambda: {"reach": 5.0, "hold": 0.1})


@dataclass
class SessionPlan:
    """What the tokenizer needs to know about a session, computed once per session."""

    session_index: int
    unit_map: np.ndarray  # local unit index -> global vocabulary index
    outputs: list[tuple[int, str, int, float]]  # (readout index, behaviour, dims, scale)


class Tokenizer:
    def __init__(self, cfg: TokenizerConfig, unit_vocab, session_vocab, readout_dims: dict[str, int]) -> None:
        """unit_vocab/session_vocab: anything with `lookup(ids) -> indices` (the model's VocabEmbedding)."""
        unknown = set(cfg.readouts) - set(readout_dims)
        if unknown:
            raise ValueError(f"tokenizer readouts {sorted(unknown)} are not readouts of the model {sorted(readout_dims)}")
        self.cfg = cfg
        self.unit_vocab, self.session_vocab = unit_vocab, session_vocab
        self.readout_names = list(readout_dims)
        self.readout_dims = readout_dims
        self.max_dim = max(readout_dims.values())
        n_steps = int(round(cfg.window / cfg.latent_step))
        self.latent_index = np.tile(np.arange(cfg.latents_per_step, dtype=np.int64), n_steps)
        centres = (np.arange(n_steps) + 0.5) * cfg.latent_step
        self.latent_time = np.repeat(centres, cfg.latents_per_step).astype(np.float32)
        self._plans: dict[str, SessionPlan] = {}

    def plan(self, reader: SessionReader) -> SessionPlan:
        p = self._plans.get(reader.session_id)
        if p is None:
            outputs = []
            for name, behaviours in self.cfg.readouts.items():
                b = next((x for x in behaviours if x in reader.behaviour_names), None)
                if b is None:
                    continue
                dims = len(reader.attrs["behaviour"][b]["columns"])
                if dims != self.readout_dims[name]:
                    raise ValueError(f"session {reader.session_id}: behaviour {b} has {dims} columns, readout "
                                     f"{name} predicts {self.readout_dims[name]}")
                outputs.append((self.readout_names.index(name), b, dims, float(self.cfg.target_scale.get(b, 1.0))))
            p = self._plans[reader.session_id] = SessionPlan(
                session_index=int(self.session_vocab.lookup([reader.session_id])[0]),
                unit_map=self.unit_vocab.lookup(reader.unit_ids), outputs=outputs)
        return p

    def needs(self, reader: SessionReader) -> tuple[list[str], list[str]]:
        """(behaviours, interval sets) a window of this session must carry to be tokenized."""
        return [b for _, b, _, _ in self.plan(reader).outputs], list(self.cfg.interval_weights)

    def __call__(self, w: Window, reader: SessionReader, keep_units: np.ndarray | None = None) -> Sample:
        """Tokenize a window; `keep_units` (local indices) drops the other units' spikes and tokens."""
        d = self.pack([(w, reader, keep_units)])
        return Sample(
            unit_index=d["unit_index"], input_time=d["input_time"], token_type=d["token_type"],
            latent_index=self.latent_index, latent_time=self.latent_time, output_time=d["output_time"],
            output_readout=d["output_readout"], target=d["target"], weight=d["weight"],
            session_index=self.plan(reader).session_index, session_id=reader.session_id, t_start=w.t_start,
        )

    def pack(self, items: Sequence[tuple[Window, SessionReader, np.ndarray | None]]) -> dict:
        """Tokenize and pack a batch of (window, reader, kept units or None) in one pass: what
        `pack_numpy` of the windows' Samples gives, with one concatenation per field for the whole
        batch (the data service's hot path: numpy call overhead, not arithmetic, is its cost)."""
        B = len(items)
        ids, times, seg = [], [], []  # input tokens: per window spikes, START and END segments
        out_t, out_y, out_wins, out_r, scales, out_lens = [], [], [], [], [], []  # output queries, per readout
        sessions, sids, t0s = [], [], []
        zeros = np.zeros(0, dtype=np.float64)
        for w, reader, keep in items:
            p = self.plan(reader)
            spikes, t = w.spike_units, w.spike_times
            if keep is None:
                units = p.unit_map
            else:
                keep = np.asarray(keep, dtype=np.int64)
                kept = np.zeros(len(p.unit_map), dtype=bool)
                kept[keep] = True
                sel = kept[spikes]
                spikes, t = spikes[sel], t[sel]
                units = p.unit_map[keep]
            n_u = len(units)
            if len(zeros) < n_u:
                zeros = np.zeros(max(n_u, 2 * len(zeros)), dtype=np.float64)
            ids += (p.unit_map[spikes], units, units)
            times += (t, zeros[:n_u], np.full(n_u, w.t_end - w.t_start))
            seg += (len(t), n_u, n_u)
            n_out = 0
            for readout, b, dims, scale in p.outputs:
                s = w.behaviour[b]
                n = len(s.timestamps)
                y = s.values
                if dims != self.max_dim:
                    y = np.zeros((n, self.max_dim), dtype=np.float64)
                    y[:, :dims] = s.values
                out_t.append(s.timestamps)
                out_y.append(y)
                out_wins.append(w)
                out_r.append((readout, n))
                scales.append((scale, n))
                n_out += n
            out_lens.append(n_out)
            sessions.append(p.session_index)
            sids.append(reader.session_id)
            t0s.append(w.t_start)
        cat = np.concatenate
        seg = np.asarray(seg, dtype=np.int64)
        in_lens = seg.reshape(B, 3).sum(1)
        if out_t:
            rr, rn = np.asarray(out_r, dtype=np.int64).T
            sc, sn = np.asarray([s for s, _ in scales], dtype=np.float64), np.asarray([n for _, n in scales])
            # divided in float64 and rounded once: the same float32 as dividing each window on its own
            target = (cat(out_y, dtype=np.float64) / np.repeat(sc, sn)[:, None]).astype(np.float32)
            output_time, readouts, weight = cat(out_t, dtype=np.float32), np.repeat(rr, rn), self._weights(out_wins, out_t)
        else:
            target, output_time = np.zeros((0, self.max_dim), np.float32), np.zeros(0, np.float32)
            readouts, weight = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return {
            "unit_index": cat(ids) if ids else np.zeros(0, np.int64),
            "input_time": cat(times, dtype=np.float32) if times else np.zeros(0, np.float32),
            "token_type": np.repeat(np.tile(np.array([SPIKE, START, END], dtype=np.int64), B), seg),
            "latent_index": np.tile(self.latent_index, B), "latent_time": np.tile(self.latent_time, B),
            "output_time": output_time, "output_readout": readouts,
            "output_session": np.repeat(np.asarray(sessions, dtype=np.int64), out_lens),
            "target": target, "weight": weight,
            "input_lens": in_lens.tolist(), "latent_lens": [len(self.latent_index)] * B, "output_lens": out_lens,
            "session_ids": sids, "t_starts": t0s,
        }

    def _weights(self, wins: Sequence[Window], times: list[np.ndarray]) -> np.ndarray:
        """Loss weight per output time (float32, concatenated over windows): the product of the
        weights of the interval sets holding it. One pass for the whole batch: window k's times and
        rows are shifted by k * (longest window + 1) s, so windows cannot overlap, and each set is
        normalised and searched once."""
        n = np.fromiter((len(t) for t in times), dtype=np.int64, count=len(times))
        weight = np.ones(int(n.sum()), dtype=np.float32)
        if not len(weight) or not self.cfg.interval_weights:
            return weight
        shift = np.arange(len(wins)) * (max(w.t_end - w.t_start for w in wins) + 1.0)
        t = np.concatenate(times) + np.repeat(shift, n)
        for name, wt in self.cfg.interval_weights.items():
            parts = [w.intervals.get(name, _NO_ROWS) for w in wins]
            m = np.fromiter((len(r) for r in parts), dtype=np.int64, count=len(parts))
            if not m.any():
                continue
            rows = iv.normalize(np.concatenate(parts) + np.repeat(shift, m)[:, None])
            k = np.searchsorted(rows[:, 0], t, side="right") - 1  # iv.contains, inlined
            weight[(k >= 0) & (t < rows[np.maximum(k, 0), 1])] *= wt
        return weight
