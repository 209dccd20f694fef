"""A look at a stretch of one session: spike raster, behaviour and split domains (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .reader import open_corpus

SPLIT_COLOURS = {"train": "#cfe8cf", "valid": "#fde4b8", "test": "#f6c6c6"}


def plot_session(corpus: str | Path, session_id: str, out: str | Path, *, t0: float | None = None,
                 seconds: float = 10.0) -> Path:
    # deferred: importing matplotlib only when used keeps start-up light
    import matplotlib

    matplotlib.use("Agg")
    # deferred: importing matplotlib only when used keeps start-up light
    import matplotlib.pyplot as plt

    s = open_corpus(corpus).session(session_id)
    eval_rows = s.intervals.get("eval")
    if t0 is None:
        t0 = float(eval_rows[0, 0]) if eval_rows is not None and len(eval_rows) else float(s.domain[0, 0])
    w = s.read_window(t0, t0 + seconds)
    names = s.behaviour_names[:2]
    fig, axes = plt.subplots(1 + len(names), 1, figsize=(10, 3 + 1.6 * len(names)), sharex=True,
                             gridspec_kw={"height_ratios": [3] + [1] * len(names)})
    axes = np.atleast_1d(axes)
    for ax in axes:
        for split, colour in SPLIT_COLOURS.items():
            for a, b in w.intervals.get(split, []):
                ax.axvspan(t0 + a, t0 + b, color=colour, lw=0, zorder=0)
    axes[0].scatter(t0 + w.spike_times, w.spike_units, s=1.5, c="k", marker="|", lw=0.6)
    axes[0].set_ylabel("unit")
    axes[0].set_title(f"{session_id}  ({s.attrs['subject']}, {s.attrs['task']}; shading: train / valid / test)")
    for ax, name in zip(axes[1:], names):
        b = w.behaviour[name]
        cols = s.attrs["behaviour"][name]["columns"]
        for k in range(b.values.shape[1]):
            ax.plot(t0 + b.timestamps, b.values[:, k], lw=1, label=cols[k])
        ax.set_ylabel(f"{name}\n[{s.attrs['behaviour'][name]['unit']}]")
        ax.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
