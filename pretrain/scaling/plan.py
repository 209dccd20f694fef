"""What a scaling sweep runs: its config (`configs/sweeps/*.yaml`), the points it expands to, and
each point's axes measured on the corpus (N, D, FLOPs per sample, hours, subjects).

    sweep = load_sweep("configs/sweeps/tiny.yaml")
    for point in expand(sweep, open_corpus(sweep.base_run().data.corpus)):
        point.run  # the RunConfig `popscale pretrain` would run for it

A point is a pretraining run of the base config with one model preset, one set of training
sessions and one seed. Data size has three axes that nest: `subjects` (the first K subjects in a
seeded order), `sessions` (the first S of those subjects' sessions in a seeded order) and
`session_fraction` (that share of each session's train split, drawn as whole trials by the label
budget machinery: labels.py), so a smaller point's data is part of a larger one's. `subsets`
name session sets by manifest field (subject, task, species), by brain area (sessions with units
in the area) or by list, for "which sessions help" comparisons. Sessions set aside for the
adaptation figure (`eval.sessions`) are never trained on by any point.

N counts parameters without the vocabularies (flops.parameters); D is the spike tokens a point
is expected to see (steps x batch x the mean spikes of a window of its training data: the window
order is not enumerated); `distinct_tokens` the spikes in its training data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_service import intervals as iv
from data_service.errors import ConfigError
from data_service.reader import Corpus

from ..model.config import PRESETS
from ..model.flops import parameters, train_flops
from ..run.config import RunConfig, _build, _set, load_config, read_yaml
from ..run.plan import labelled_parts, training_sessions
from ..tokens.config import TokenizerConfig

AXES = ("model", "subjects", "sessions", "session_fraction", "subset", "steps", "seed")


@dataclass
class Budget:
    kind: str = "fixed-steps"  # fixed-steps | equal-compute
    steps: int = 300  # fixed-steps: every point trains this many steps
    flops: float | None = None  # equal-compute: training FLOPs per point (steps = flops / FLOPs per step)
    min_steps: int = 20  # equal-compute: a point below this is refused (its model is too big for the budget)

    def __post_init__(self) -> None:
        if self.kind not in ("fixed-steps", "equal-compute"):
            raise ValueError(f"budget.kind {self.kind!r}: expected fixed-steps or equal-compute")
        if self.kind == "equal-compute" and not (self.flops and self.flops > 0):
            raise ValueError("budget.kind equal-compute needs budget.flops (training FLOPs per point)")
        if self.steps < 1:
            raise ValueError("budget.steps must be at least 1")


@dataclass
class EvalConfig:
    """The lab's figure: R2 on sessions no point trains on, after the same unit-id adaptation."""

    sessions: Any = 2  # a list of session ids, or how many to set aside (seeded; 0: no adaptation figure)
    labels: str = "100%"
    steps: int = 50
    batch: int = 16

    def __post_init__(self) -> None:
        ok = (isinstance(self.sessions, int) and not isinstance(self.sessions, bool) and self.sessions >= 0) or (
            isinstance(self.sessions, list) and all(isinstance(x, str) for x in self.sessions))
        if not ok:
            raise ValueError(f"eval.sessions {self.sessions!r}: a number of sessions to set aside, or a list of ids")


@dataclass
class SweepConfig:
    name: str
    base: str = "configs/demo.yaml"  # the run config every point starts from
    overrides: list[str] = field(default_factory=list)  # applied to the base (key.sub=value)
    grid: dict[str, list] = field(default_factory=dict)  # axis -> values; the points are their product
    points: list[dict] = field(default_factory=list)  # explicit points (axis -> value), after the grid's
    subsets: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> {field: [values]}
    # named model shapes beyond the presets: name -> {preset: poyo-1.3M, <model field>: value, ...}
    models: dict[str, dict] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget)
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_concurrent: int = 1  # points in flight at once
    seed: int = 0  # the sessions set aside and the nested session / subject order
    storage: str = "runs/sweeps"  # each point's run directory (Ray checkpoints) is under storage/name/
    experiment: str = "popscale-sweep"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name {self.name!r}: a non-empty name without '/'")
        for axis in [*self.grid, *(k for p in self.points for k in p)]:
            if axis not in AXES:
                raise ValueError(f"axis {axis!r}: known axes are {', '.join(AXES)}")
        for axis, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{axis}: expected a non-empty list of values")
            for v in values:
                _check_axis_value(axis, v, f"grid.{axis}")
        for i, p in enumerate(self.points):
            for axis, v in p.items():
                _check_axis_value(axis, v, f"points[{i}].{axis}")
        for m in self.grid.get("model", []) + [p["model"] for p in self.points if "model" in p]:
            if m not in PRESETS and m not in self.models:
                raise ValueError(f"model {m!r}: not a preset (known: {', '.join(sorted(PRESETS))}) nor defined "
                                 f"under models (defined: {sorted(self.models) or 'none'})")
        for name, spec in self.models.items():
            if not isinstance(spec, dict) or spec.get("preset", "poyo-1.3M") not in PRESETS:
                raise ValueError(f"models.{name}: expected {{preset: <a preset>, <model field>: value, ...}}")
        for s in self.grid.get("subset", []) + [p["subset"] for p in self.points if "subset" in p]:
            if s != "all" and s not in self.subsets:
                raise ValueError(f"subset {s!r} is not defined under subsets (defined: {sorted(self.subsets) or 'none'})")
        for name, sel in self.subsets.items():
            if not isinstance(sel, dict) or not sel:
                raise ValueError(f"subsets.{name}: expected a mapping like {{subject: [a, b]}}")
        if self.budget.kind == "equal-compute" and ("steps" in self.grid or any("steps" in p for p in self.points)):
            raise ValueError("a steps axis contradicts budget.kind equal-compute (there steps follow from the budget)")
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]

    def base_run(self) -> RunConfig:
        return load_config(self.base, self.overrides)


def _check_axis_value(axis: str, v, where: str) -> None:
    """An axis value of the right type, refused at load (not after the corpus is made and Ray started)."""
    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    ok = {"model": lambda x: isinstance(x, str), "subset": lambda x: isinstance(x, str),
          "subjects": lambda x: count(x) and x >= 1, "sessions": lambda x: count(x) and x >= 1,
          "steps": lambda x: count(x) and x >= 1, "seed": lambda x: count(x) and x >= 0,
          "session_fraction": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1}
    want = {"model": "a model name", "subset": "a subset name", "subjects": "a whole number >= 1",
            "sessions": "a whole number >= 1", "steps": "a whole number >= 1", "seed": "a whole number >= 0",
            "session_fraction": "a number in (0, 1]"}
    if v is None and axis in ("subjects", "sessions", "steps", "session_fraction"):  # null: all / the budget's
        return
    if axis in ok and not ok[axis](v):
        raise ValueError(f"{where}: {v!r} is not {want[axis]}")


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """A SweepConfig from YAML; `overrides` (key=value) apply to the sweep file itself."""
    d = read_yaml(path, "sweep file")
    for o in overrides:
        k, eq, v = o.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"sweep override {o!r} must look like key=value")
        try:
            _set(d, k.strip(), yaml.safe_load(v))
        except ConfigError as e:
            raise ConfigError(f"sweep override {o!r}: {e}") from None
        except (yaml.YAMLError, ValueError):  # (PyYAML's int() raises ValueError on huge integers)
            raise ConfigError(f"sweep override {o!r}: the value is not valid YAML") from None
    d.setdefault("name", Path(path).stem)
    try:
        cfg = _build(SweepConfig, d, "")
        cfg.base_run()
    except ConfigError as e:
        raise ConfigError(f"sweep file {path}: {e}") from None
    return cfg


@dataclass
class Point:
    key: str  # stable id: the axes' values
    axes: dict  # axis -> value as configured
    run: RunConfig
    sessions: list[str]
    figures: dict[str, float]  # N, D, flops_per_sample, hours, subjects, ... (measured on the corpus)

    @property
    def tags(self) -> dict[str, str]:
        return {**{f"axis.{k}": str(v) for k, v in self.axes.items()},
                **{k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in self.figures.items()}}


def _order(items: list[str], seed: int, what: str) -> list[str]:
    """A seeded order of `items` that does not depend on their listing order."""
    items = sorted(items)
    key = int(hashlib.sha256(f"{seed}:{what}".encode()).hexdigest()[:15], 16)
    return [items[i] for i in np.random.default_rng(key).permutation(len(items))]


def eval_sessions(cfg: SweepConfig, corpus: Corpus, eligible: list[str]) -> list[str]:
    e = cfg.eval.sessions
    if isinstance(e, list):
        missing = [s for s in e if s not in corpus.rows]
        if missing:
            raise ConfigError(f"eval.sessions {missing} are not in the corpus", )
        return list(e)
    if e < 0 or e >= len(eligible):
        raise ConfigError(f"eval.sessions={e}: the corpus has {len(eligible)} sessions a readout decodes; "
                          "set aside fewer")
    return _order(eligible, cfg.seed, "eval")[:e]


def _in_subset(corpus: Corpus, sid: str, sel: dict[str, list]) -> bool:
    row = corpus.rows[sid]
    for f, values in sel.items():
        values = [str(v) for v in values]
        if f == "sessions":
            ok = sid in values
        elif f in ("area", "brain_area"):
            ok = bool(set(map(str, corpus.session(sid).unit_areas.tolist())) & set(values))
        elif f in row:
            ok = str(row[f]) in values
        else:
            raise ConfigError(f"subset field {f!r}: not a manifest field (known: sessions, area, "
                              f"{', '.join(k for k in row if isinstance(row[k], str))})")
        if not ok:
            return False
    return True


def _axes_of(cfg: SweepConfig) -> list[dict]:
    grid = [dict(zip(cfg.grid, values)) for values in itertools.product(*cfg.grid.values())] if cfg.grid else []
    out, seen = [], set()
    for p in grid + [dict(p) for p in cfg.points]:
        k = json.dumps(p, sort_keys=True, default=str)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out or [{}]


def point_key(axes: dict) -> str:
    parts = [f"{k}={axes[k]}" for k in AXES if k in axes]
    text = "_".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "=._-" else "-" for c in text)


def _session_counts(corpus: Corpus, sid: str, part: np.ndarray, behaviours: list[str]) -> tuple[float, int, int, int]:
    """(seconds, spikes, units, behaviour samples) of one session inside `part`."""
    r = corpus.session(sid)
    times, _ = r.spikes()
    spikes = sum(int(np.searchsorted(times, b) - np.searchsorted(times, a)) for a, b in part)
    samples = 0
    for b in behaviours:
        if b in r.behaviour_names:
            ts = r.behaviour(b)[0]
            samples = sum(int(np.searchsorted(ts, hi) - np.searchsorted(ts, lo)) for lo, hi in part)
            break
    return iv.total(part), spikes, len(r.unit_ids), samples


def data_figures(corpus: Corpus, sessions: list[str], within: dict[str, np.ndarray] | None, window_s: float,
                 behaviours: list[str], cache: dict | None = None) -> dict[str, float]:
    """Hours, spikes, mean tokens and queries per window of the training part of `sessions`
    (`cache` keeps each session's counts between points that share it)."""
    cache = {} if cache is None else cache
    seconds = spikes = units_time = samples = 0.0
    subjects = set()
    for sid in sessions:
        part = within[sid] if within is not None else iv.normalize(corpus.session(sid).intervals.get("train", iv.EMPTY))
        key = (sid, np.asarray(part).tobytes())
        if key not in cache:
            cache[key] = _session_counts(corpus, sid, part, behaviours)
        t, n, units, m = cache[key]
        seconds, spikes, units_time, samples = seconds + t, spikes + n, units_time + t * units, samples + m
        subjects.add(corpus.rows[sid].get("subject", sid))
    per_s = 1.0 / max(seconds, 1e-9)
    return {"hours": seconds / 3600, "distinct_tokens": spikes, "subjects": len(subjects),
            # a window's input tokens: its spikes, plus a start and an end token per unit
            "inputs_per_window": window_s * (spikes + 2 * units_time) * per_s,
            "spikes_per_window": window_s * spikes * per_s, "queries_per_window": window_s * samples * per_s}


def _tokens(run: RunConfig):
    d = run.data
    return TokenizerConfig.build(run.model_config(), d.window_s, d.readouts, {}, {}, 0.5, d.readout_kinds,
                                 d.readout_columns)


def expand(cfg: SweepConfig, corpus: Corpus) -> tuple[list[Point], list[str]]:
    """The sweep's points (in config order) and the sessions set aside for the adaptation figure."""
    base = cfg.base_run()
    tok = _tokens(base)
    eligible = training_sessions(base, corpus, tok)
    held = eval_sessions(cfg, corpus, eligible)
    pool = [s for s in eligible if s not in held]
    behaviours = [b for r in tok.readouts for b in r.behaviours]
    points, counts = [], {}
    for axes in _axes_of(cfg):
        run = cfg.base_run()
        run.data.synth = None
        shape = axes.get("model", run.model)
        if shape in cfg.models:
            spec = dict(cfg.models[shape])
            run.model = spec.pop("preset", "poyo-1.3M")
            run.model_overrides = {**run.model_overrides, **spec}
        else:
            run.model = shape
        subset = axes.get("subset", "all")
        chosen = [s for s in pool if subset == "all" or _in_subset(corpus, s, cfg.subsets[subset])]
        if axes.get("subjects") is not None:
            subjects = _order(sorted({str(corpus.rows[s].get("subject", s)) for s in chosen}), cfg.seed, "subjects")
            keep = set(subjects[: int(axes["subjects"])])
            if len(keep) < int(axes["subjects"]):
                raise ConfigError(f"point {point_key(axes)}: asks for {axes['subjects']} subjects; "
                                  f"{len(keep)} are available")
            chosen = [s for s in chosen if str(corpus.rows[s].get("subject", s)) in keep]
        if axes.get("sessions") is not None:
            n = int(axes["sessions"])
            if n > len(chosen):
                raise ConfigError(f"point {point_key(axes)}: asks for {n} sessions; {len(chosen)} are available "
                                  f"(after setting aside {len(held)} for evaluation)")
            chosen = _order(chosen, cfg.seed, "sessions")[:n]
        else:
            chosen = sorted(chosen)
        if not chosen:
            raise ConfigError(f"point {point_key(axes)}: no training session is left")
        frac = axes.get("session_fraction")
        if frac is not None:
            if not 0 < float(frac) <= 1:
                raise ConfigError(f"point {point_key(axes)}: session_fraction must be in (0, 1]")
            run.data.labels = f"{100 * float(frac):g}%"
        run.data.sessions = chosen
        if "seed" in axes:
            run.train.seed = run.data.seed = int(axes["seed"])
        run.name = f"{cfg.name}-{point_key(axes)}"
        model = run.model_config()
        geometry = _tokens(run).geometry
        fig = data_figures(corpus, chosen, labelled_parts(run, corpus, chosen), run.data.window_s, behaviours, counts)
        per_sample = train_flops(model, fig["inputs_per_window"], fig["queries_per_window"], geometry.n_latents)
        samples_per_step = run.data.global_batch * run.train.grad_accum
        if cfg.budget.kind == "equal-compute":
            steps = int(round(cfg.budget.flops / (per_sample * samples_per_step)))
            if steps < cfg.budget.min_steps:
                raise ConfigError(f"point {point_key(axes)}: budget.flops {cfg.budget.flops:.3g} buys {steps} steps of "
                                  f"{run.model} (under budget.min_steps {cfg.budget.min_steps})")
        else:
            steps = int(axes.get("steps") or cfg.budget.steps)
        t = run.train
        t.steps, t.stop_at = steps, None
        t.warmup_steps = min(t.warmup_steps, max(1, steps // 10))
        t.checkpoint_every = min(t.checkpoint_every, steps)
        t.eval_every = steps  # validation R2 once, at the end (the held-out loss is measured after training)
        fig.update({"N": float(parameters(model)), "flops_per_sample": per_sample, "steps": float(steps),
                    "D": steps * samples_per_step * fig["spikes_per_window"],
                    "compute": steps * samples_per_step * per_sample, "n_sessions": float(len(chosen))})
        points.append(Point(point_key(axes), axes, run, chosen, fig))
    keys = [p.key for p in points]
    if len(set(keys)) != len(keys):
        raise ConfigError("two points have the same axes")
    return points, held


def with_storage(run: RunConfig, sweep_dir: Path) -> RunConfig:
    """The point's run, checkpointing under the sweep's directory."""
    return replace(run, cluster=replace(run.cluster, storage_path=str(sweep_dir / "runs")))
