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

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import numpy as np

from data_service import intervals as iv
from data_service.reader import SessionReader, Window

from ..model.batch import END, SPIKE, START, PackedBatch
from ..model.config import ModelConfig
from .targets import TargetStats

_NO_ROWS = np.zeros((0, 2))
# readout -> the behaviours it decodes, the first one a session has wins
DEFAULT_BEHAVIOURS: dict[str, list[str]] = {"velocity": ["hand_vel", "hand_velocity", "cursor_vel", "cursor_velocity",
                                                       "finger_vel", "finger_velocity", "vel", "velocity"]}
DEFAULT_INTERVAL_WEIGHTS: dict[str, float] = {"reach": 5.0, "hold": 0.1}


class VocabLookup(Protocol):
    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        """int64 vocabulary index of every id (an unknown id is an error naming it)."""
        ...


@dataclass
class Geometry:
    """The time layout of one sample: a window of `window_s` seconds and its latent grid,
    `latents_per_step` latents every `latent_step` seconds."""

    window_s: float = 1.0
    latent_step: float = 0.125
    latents_per_step: int = 16

    @property
    def n_steps(self) -> int:
        return int(round(self.window_s / self.latent_step))

    @property
    def n_latents(self) -> int:
        return self.latents_per_step * self.n_steps

    def check(self) -> None:
        if self.window_s <= 0 or self.latent_step <= 0 or self.latents_per_step < 1:
            raise ValueError(f"window geometry must be positive, got {self}")
        if abs(self.n_steps * self.latent_step - self.window_s) > 1e-9 * self.window_s:
            raise ValueError(f"the window ({self.window_s} s) must be a whole number of latent steps "
                             f"({self.latent_step} s)")


KINDS = ("continuous", "angular", "categorical")


@dataclass
class Readout:
    """One of the model's outputs: its width, the behaviours (by name) it decodes, and its kind:
    - continuous: the behaviour's columns, on the common scale (targets.py), MSE;
    - angular: a one-column angle in radians (head direction), learned and scored as (cos, sin)
      (dims 2), MSE; decoded back to an angle;
    - categorical: a one-column class id in [0, dims) (e.g. target_id), cross-entropy on dims
      logits, scored by accuracy; decoded to the most likely class."""

    name: str
    dims: int
    behaviours: list[str] = field(default_factory=list)
    kind: str = "continuous"
    # the behaviour's columns to use, by name: one for angular/categorical (default: the first); for a
    # continuous readout a comma-separated list ("x,y" of a 3-D position; default: all of them)
    column: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"readout {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        wanted = self.wanted_columns()
        if wanted is not None and self.kind != "continuous" and len(wanted) != 1:
            raise ValueError(f"readout {self.name}: a {self.kind} readout reads one column, got {self.column!r}")
        if wanted is not None and self.kind == "continuous" and len(wanted) != self.dims:
            raise ValueError(f"readout {self.name}: columns {self.column!r} are {len(wanted)}, its dims {self.dims}")
        if self.kind == "angular" and self.dims != 2:
            raise ValueError(f"readout {self.name}: an angular readout predicts (cos, sin): dims must be 2, "
                             f"got {self.dims}")
        if self.kind == "categorical" and self.dims < 2:
            raise ValueError(f"readout {self.name}: a categorical readout needs dims = number of classes >= 2")

    def wanted_columns(self) -> list[str] | None:
        return [c.strip() for c in self.column.split(",")] if self.column else None

    def select(self, names: list[str], session: str = "", behaviour: str = "") -> list[int] | None:
        """Indices of the columns (of a behaviour with these column names) this readout reads; None:
        all of them. An unknown column is an error naming the session and behaviour."""
        wanted = self.wanted_columns()
        if wanted is None:
            return None if self.kind == "continuous" else [0]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"session {session}: behaviour {behaviour} has no column {missing[0]!r} (it has {names}) "
                             f"for readout {self.name}")
        return [names.index(c) for c in wanted]


@dataclass
class TokenizerConfig:
    geometry: Geometry = field(default_factory=Geometry)
    readouts: list[Readout] = field(default_factory=lambda: [Readout("velocity", 2, DEFAULT_BEHAVIOURS["velocity"])])
    target_scale: dict[str, float] = field(default_factory=dict)  # behaviour -> divisor fixed by the config
    interval_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_INTERVAL_WEIGHTS))
    # session -> behaviour -> its train-split statistics (every other behaviour); with none at all
    # (a tokenizer made by hand) targets are left in the session's units
    target_stats: dict[str, dict[str, TargetStats]] = field(default_factory=dict)
    target_rms: float = 0.5  # the RMS a behaviour scaled by its statistics has (targets.py says why)

    @classmethod
    def build(cls, model: ModelConfig, window_s: float = 1.0, behaviours: dict[str, list[str]] | None = None,
              target_scale: dict[str, float] | None = None, interval_weights: dict[str, float] | None = None,
              target_rms: float = 0.5, kinds: dict[str, str] | None = None,
              columns: dict[str, str] | None = None) -> "TokenizerConfig":
        """The tokenizer for `model` (its readouts, in its order; its latent grid) over windows of
        `window_s` seconds; `behaviours`: readout -> accepted behaviour names."""
        behaviours = DEFAULT_BEHAVIOURS if behaviours is None else behaviours
        unknown = sorted(set(behaviours) - set(model.readouts))
        if unknown:
            raise ValueError(f"readouts {unknown} are not readouts of the model (it has {sorted(model.readouts)})")
        geometry = Geometry(window_s, model.latent_step, model.latents_per_step)
        geometry.check()
        if not target_rms > 0:
            raise ValueError(f"target_rms must be > 0, got {target_rms}")
        unknown = sorted(set(kinds or {}) - set(model.readouts))
        if unknown:
            raise ValueError(f"readout kinds for {unknown}, which are not readouts of the model")
        return cls(geometry, [Readout(n, d, list(behaviours.get(n, [])), (kinds or {}).get(n, "continuous"),
                                      (columns or {}).get(n)) for n, d in model.readouts.items()],
                   dict(target_scale or {}),
                   dict(DEFAULT_INTERVAL_WEIGHTS if interval_weights is None else interval_weights),
                   target_rms=float(target_rms))

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        stats = {s: {b: TargetStats(**x) for b, x in per.items()} for s, per in d.get("target_stats", {}).items()}
        return cls(Geometry(**d["geometry"]), [Readout(**r) for r in d["readouts"]], dict(d["target_scale"]),
                   dict(d["interval_weights"]), stats, float(d.get("target_rms", 0.5)))

    def normaliser(self, session: str, behaviour: str, dims: int, width: int, kind: str = "continuous"
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(shift, scale), `width` columns each (unused ones 0 and 1): target = (value - shift) / scale.
        Angles and class ids are used as they are."""
        shift, scale = np.zeros(width), np.ones(width)
        if kind != "continuous":
            return shift, scale
        if behaviour in self.target_scale:
            scale[:dims] = float(self.target_scale[behaviour])
        elif self.target_stats:
            st = self.target_stats.get(session, {}).get(behaviour)
            if st is None:
                raise KeyError(f"no target statistics for behaviour {behaviour} of session {session}: the model "
                               "was not trained or adapted on it (popscale finetune adds a session)")
            shift[:dims], scale[:dims] = st.mean, st.std / self.target_rms
        return shift, scale


@dataclass
class SessionLayout:
    """What the tokenizer needs to know about a session, computed once per session."""

    session_index: int
    unit_map: np.ndarray  # local unit index -> global vocabulary index
    # (readout index, behaviour, dims, shift, scale): target = (value - shift) / scale, per column
    outputs: list[tuple[int, str, int, np.ndarray, np.ndarray]]
    needs: tuple[list[str], list[str]] | None = None  # Tokenizer.needs, once computed


def _segment_sums(flags: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """How many of `flags` are set in each consecutive segment of the given lengths (empty ones too)."""
    c = np.zeros(len(flags) + 1, dtype=np.int64)
    np.cumsum(flags, out=c[1:])
    ends = np.cumsum(lens)
    return c[ends] - c[ends - lens]


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
                b = next((x for x in ro.behaviours if x in reader.behaviour_names), None)
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
        """One window as a batch of one; `keep_units` (local indices or a mask over the session's units) drops the other units' spikes and tokens."""
        return self.pack([(w, reader, keep_units)])

    def pack(self, items: Sequence[tuple[Window, SessionReader, np.ndarray | None]]) -> PackedBatch:
        """Tokenize and pack a batch of (window, reader, kept units) in one pass: what joining the
        windows packed one by one gives, with one concatenation per field for the whole batch (the
        data service's hot path: numpy call overhead, not arithmetic, is its cost). Kept units are
        None (all), local indices, or a boolean mask over the session's units."""
        B = len(items)
        maps, spikes, stimes, masks, durs = [], [], [], [], []  # input tokens, per window
        out_t, out_y, out_wins, out_r, scales, out_lens = [], [], [], [], [], []  # output queries, per readout
        sessions, sids, t0s = [], [], []
        dropout = False
        for w, reader, keep in items:
            p = self.layout(reader)
            maps.append(p.unit_map)
            spikes.append(w.spike_units)
            stimes.append(w.spike_times)
            durs.append(w.t_end - w.t_start)
            if keep is not None:
                keep = np.asarray(keep)
                if keep.dtype != np.bool_:
                    m = np.zeros(len(p.unit_map), dtype=bool)
                    m[keep.astype(np.int64, copy=False)] = True
                    keep = m
                dropout = True
            masks.append(keep)
            n_out = 0
            for readout, b, dims, shift, scale in p.outputs:
                s = w.behaviour[b]
                n = len(s.timestamps)
                y = s.values
                col = self._column.get((reader.session_id, readout))
                if col is not None:
                    y = np.asarray(y)[:, col]
                if readout in self._angular:  # an angle is learned as (cos, sin)
                    a = np.asarray(y, dtype=np.float64)[:, 0]
                    y = np.stack([np.cos(a), np.sin(a)], axis=1)
                if dims != self.max_dim:
                    y2 = np.zeros((n, self.max_dim), dtype=np.float64)
                    y2[:, :dims] = y
                    y = y2
                out_t.append(s.timestamps)
                out_y.append(y)
                out_wins.append(w)
                out_r.append((readout, n))
                scales.append((shift, scale, n))
                n_out += n
            out_lens.append(n_out)
            sessions.append(p.session_index)
            sids.append(reader.session_id)
            t0s.append(w.t_start)
        unit_index, input_time, seg = self._input_tokens(maps, spikes, stimes, masks if dropout else None, durs)
        cat = np.concatenate
        in_lens = seg.reshape(B, 3).sum(1)
        if out_t:
            rr, rn = np.asarray(out_r, dtype=np.int64).T
            sn = np.asarray([n for _, _, n in scales])
            shift = np.repeat(np.stack([s for s, _, _ in scales]), sn, axis=0)
            scale = np.repeat(np.stack([s for _, s, _ in scales]), sn, axis=0)
            # in float64 and rounded once: the same float32 as normalising each window on its own
            target = ((cat(out_y, dtype=np.float64) - shift) / scale).astype(np.float32)
            output_time, readouts, weight = cat(out_t, dtype=np.float32), np.repeat(rr, rn), self._weights(out_wins, out_t)
        else:
            target, output_time = np.zeros((0, self.max_dim), np.float32), np.zeros(0, np.float32)
            readouts, weight = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return PackedBatch(
            unit_index=unit_index, input_time=input_time,
            token_type=np.repeat(np.tile(np.array([SPIKE, START, END], dtype=np.int64), B), seg),
            latent_index=np.tile(self.latent_index, B), latent_time=np.tile(self.latent_time, B),
            output_time=output_time, output_readout=readouts,
            output_session=np.repeat(np.asarray(sessions, dtype=np.int64), out_lens),
            target=target, weight=weight,
            input_lens=in_lens.tolist(), latent_lens=[len(self.latent_index)] * B, output_lens=out_lens,
            session_ids=sids, t_starts=t0s,
        )

    @staticmethod
    def _input_tokens(maps: list[np.ndarray], spikes: list[np.ndarray], stimes: list[np.ndarray],
                      masks: list[np.ndarray | None] | None, durs: list[float]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit_index, input_time, segment lengths) of a batch's input tokens: per window its
        kept spikes, then a START and an END token per kept unit. Unit dropout is applied to the
        whole batch at once (one gather over every window's spikes, offset into one concatenated
        unit map), then the arrays are cut per window: a few numpy calls a window instead of ten."""
        B = len(maps)
        cat = np.concatenate
        n_units = np.fromiter((len(m) for m in maps), dtype=np.int64, count=B)
        n_spk = np.fromiter((len(s) for s in spikes), dtype=np.int64, count=B)
        umap = cat(maps) if B else np.zeros(0, np.int64)
        t = cat(stimes) if B else np.zeros(0)
        # every spike's unit as a position in the concatenated map
        g = (cat(spikes) if B else np.zeros(0, np.int64)) + np.repeat(np.cumsum(n_units) - n_units, n_spk)
        if masks is None:
            ks, nk, upos = n_spk, n_units, None
        else:
            kept = cat([np.ones(n, dtype=bool) if m is None else m for m, n in zip(masks, n_units.tolist())])
            hit = kept.take(g)
            sel = np.flatnonzero(hit)
            g, t = g.take(sel), t.take(sel)
            ks, nk = _segment_sums(hit, n_spk), _segment_sums(kept, n_units)
            upos = np.flatnonzero(kept)
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
