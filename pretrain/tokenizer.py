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

import numpy as np

from data_service import intervals as iv
from data_service.reader import SessionReader, Window

from .batch import END, SPIKE, START, Sample


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
        p = self.plan(reader)
        length = w.t_end - w.t_start
        units = np.arange(len(p.unit_map)) if keep_units is None else np.asarray(keep_units, dtype=np.int64)
        spikes = w.spike_units
        times = w.spike_times
        if keep_units is not None:
            kept = np.zeros(len(p.unit_map), dtype=bool)
            kept[units] = True
            sel = kept[spikes]
            spikes, times = spikes[sel], times[sel]
        # filled in place: this runs for every training window, and numpy call overhead dominates
        n_s, n_u = len(spikes), len(units)
        a, b = n_s, n_s + n_u
        unit_index = np.empty(b + n_u, dtype=np.int64)
        unit_index[:a] = p.unit_map[spikes]
        unit_index[a:b] = p.unit_map[units]
        unit_index[b:] = unit_index[a:b]
        input_time = np.empty(b + n_u, dtype=np.float32)
        input_time[:a] = times
        input_time[a:b] = 0.0
        input_time[b:] = length
        token_type = np.empty(b + n_u, dtype=np.int64)
        token_type[:a] = SPIKE
        token_type[a:b] = START
        token_type[b:] = END

        out_t, out_r, out_y, out_w = [], [], [], []
        for readout, b, dims, scale in p.outputs:
            s = w.behaviour[b]
            n = len(s.timestamps)
            if dims == self.max_dim:
                y = (s.values / scale).astype(np.float32, copy=False)
            else:
                y = np.zeros((n, self.max_dim), dtype=np.float32)
                y[:, :dims] = s.values / scale
            weight = np.ones(n, dtype=np.float32)
            for name, wt in self.cfg.interval_weights.items():
                rows = w.intervals.get(name)
                if rows is not None and len(rows):
                    rows = iv.normalize(rows)
                    k = np.searchsorted(rows[:, 0], s.timestamps, side="right") - 1  # iv.contains, inlined
                    weight[(k >= 0) & (s.timestamps < rows[np.maximum(k, 0), 1])] *= wt
            out_t.append(s.timestamps.astype(np.float32))
            r = np.empty(n, dtype=np.int64)
            r[:] = readout
            out_r.append(r)
            out_y.append(y)
            out_w.append(weight)
        if not out_t:
            out_t, out_r = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
            out_y, out_w = [np.zeros((0, self.max_dim), np.float32)], [np.zeros(0, np.float32)]
        one = len(out_t) == 1
        return Sample(
            unit_index=unit_index, input_time=input_time, token_type=token_type,
            latent_index=self.latent_index, latent_time=self.latent_time,
            output_time=out_t[0] if one else np.concatenate(out_t),
            output_readout=out_r[0] if one else np.concatenate(out_r),
            target=out_y[0] if one else np.concatenate(out_y), weight=out_w[0] if one else np.concatenate(out_w),
            session_index=p.session_index, session_id=reader.session_id, t_start=w.t_start,
        )
