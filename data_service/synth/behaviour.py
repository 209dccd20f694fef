"""Reaching behaviour: center-out and random-target reaches with bell-shaped speed profiles.

Each movement is a minimum-jerk trajectory (speed rises and falls like a bell) with a little
curvature and endpoint scatter, separated by holds; a small smoothed motor noise rides on top.
Positions are in cm, sampled at `hz`; velocity is the derivative of position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..session import interval_array


@dataclass
class Movement:
    start: float
    end: float
    direction: float  # radians, of the displacement


@dataclass
class Behaviour:
    t: np.ndarray
    pos: np.ndarray  # (n, 2) cm
    vel: np.ndarray  # (n, 2) cm/s
    movements: list[Movement]
    intervals: dict[str, np.ndarray] = field(default_factory=dict)


def _min_jerk(s: np.ndarray) -> np.ndarray:
    return 10 * s**3 - 15 * s**4 + 6 * s**5


@dataclass
class ReachStyle:
    """What differs between subjects: reach size and speed."""

    radius_cm: float
    speed: float  # >1 = faster movements


def reaching(task: str, duration_s: float, hz: float, style: ReachStyle, rng: np.random.Generator) -> Behaviour:
    """Reaches filling `duration_s` seconds; task is 'center_out' or 'random_target'."""
    dt = 1.0 / hz
    n = int(round(duration_s * hz))
    t = np.arange(n) * dt
    pos = np.zeros((n, 2))
    movements: list[Movement] = []
    sets: dict[str, list[tuple[float, float]]] = {"trials": [], "reach": [], "hold": [], "return": []}
    cur = np.zeros(2)
    clock = 0.0

    def hold(length: float, name: str | None = "hold") -> None:
        nonlocal clock
        a, b = int(round(clock * hz)), min(n, int(round((clock + length) * hz)))
        pos[a:b] = cur
        if name and b > a:
            sets[name].append((clock, min(clock + length, duration_s)))
        clock += length

    def move(target: np.ndarray, length: float, name: str) -> None:
        nonlocal clock, cur
        a, b = int(round(clock * hz)), min(n, int(round((clock + length) * hz)))
        s = (np.arange(a, b) * dt - clock) / length
        disp = target - cur
        perp = np.array([-disp[1], disp[0]]) / (np.linalg.norm(disp) + 1e-9)
        bow = rng.normal(0.0, 0.08) * np.linalg.norm(disp)  # slightly curved paths
        pos[a:b] = cur + np.outer(_min_jerk(s), disp) + np.outer(np.sin(np.pi * s) * bow, perp)
        if b > a:
            movements.append(Movement(clock, clock + length, float(np.arctan2(disp[1], disp[0]))))
            sets[name].append((clock, min(clock + length, duration_s)))
        cur = target
        clock += length

    while clock < duration_s - 0.5:
        trial_start = clock
        if task == "center_out":
            hold(rng.uniform(0.4, 0.8))  # center hold, incl. reaction time
            k = rng.integers(8)
            angle = 2 * np.pi * k / 8
            target = style.radius_cm * np.array([np.cos(angle), np.sin(angle)]) + rng.normal(0, 0.3, 2)
            move(target, rng.uniform(0.35, 0.6) / style.speed, "reach")
            hold(rng.uniform(0.3, 0.6))  # target hold
            move(rng.normal(0, 0.2, 2), rng.uniform(0.45, 0.7) / style.speed, "return")
            hold(rng.uniform(0.1, 0.4), None)  # inter-trial interval
        else:
            r = style.radius_cm * 1.2 * np.sqrt(rng.uniform())
            a = rng.uniform(0, 2 * np.pi)
            target = np.array([r * np.cos(a), r * np.sin(a)])
            dist = np.linalg.norm(target - cur)
            move(target, (0.25 + 0.03 * dist) * rng.uniform(0.85, 1.2) / style.speed, "reach")
            hold(rng.uniform(0.2, 0.5))
        sets["trials"].append((trial_start, min(clock, duration_s)))
    if clock < duration_s:
        pos[int(round(clock * hz)):] = cur

    # smoothed motor noise (~1 mm) so that holds are not perfectly still
    noise = rng.normal(0, 1, (n, 2))
    kernel = np.exp(-0.5 * (np.arange(-15, 16) / 5.0) ** 2)
    kernel /= np.sqrt((kernel**2).sum())
    for d in range(2):
        pos[:, d] += 0.1 * np.convolve(noise[:, d], kernel, mode="same")
    vel = np.gradient(pos, dt, axis=0)
    intervals = {k: interval_array([a for a, _ in v], [b for _, b in v]) for k, v in sets.items() if v}
    return Behaviour(t, pos, vel, movements, intervals)


def rotational_drive(t: np.ndarray, movements: list[Movement], freq_hz: float = 1.5, decay_s: float = 0.25) -> np.ndarray:
    """A 2-D rotation that starts at every movement onset and dies out (the rotational component
    seen in motor cortex population activity); its phase depends on the reach direction."""
    out = np.zeros((len(t), 2))
    hz = 1.0 / (t[1] - t[0]) if len(t) > 1 else 100.0
    span = int(5 * decay_s * hz)
    for m in movements:
        a = int(round(m.start * hz))
        b = min(len(t), a + span)
        if b <= a:
            continue
        tau = t[a:b] - m.start
        env = np.exp(-tau / decay_s)
        phase = 2 * np.pi * freq_hz * tau + m.direction
        out[a:b, 0] += env * np.cos(phase)
        out[a:b, 1] += env * np.sin(phase)
    return out
