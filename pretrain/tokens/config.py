"""What a tokenizer is configured with, apart from the tokenizer itself: the window and latent
geometry, the readouts (which behaviours each decodes, how wide, of which kind), the target scales
and interval weights, and the lookup protocol the vocabularies satisfy. A plan, an export and a
finetune config hold these; only the data path needs `Tokenizer` (tokenizer.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import numpy as np

from ..model.config import ModelConfig
from .targets import TargetStats

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

    def pick(self, have: Iterable[str], skip: Iterable[str] = ()) -> str | None:
        """The behaviour this readout decodes in a session that has `have`: the first of its list
        there, passing over those the session does not decode (`TokenizerConfig.not_decoded`)."""
        have, skip = set(have), set(skip)
        return next((x for x in self.behaviours if x in have and x not in skip), None)

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
    # session -> behaviours it has that are not decoded (their labels unused): finetune --behaviour
    # keeps an adaptation to the behaviours a comparison decodes
    not_decoded: dict[str, list[str]] = field(default_factory=dict)

    def decodes(self, session: str, behaviour: str) -> bool:
        return behaviour not in self.not_decoded.get(session, ())

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
                   dict(d["interval_weights"]), stats, float(d.get("target_rms", 0.5)),
                   {k: list(v) for k, v in d.get("not_decoded", {}).items()})

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
