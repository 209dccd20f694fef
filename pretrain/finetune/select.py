"""Model selection for adaptation: the weights with the best validation R² are kept (test is
scored once, at the end); a NaN validation never replaces them."""

from __future__ import annotations

import copy

import numpy as np


def improves(r2: float, best: float) -> bool:
    """Whether a validation figure replaces the best so far: a NaN (a diverged model) never
    replaces a finite best; while nothing finite has been seen (no validation data) the latest
    weights are kept."""
    if np.isfinite(best):
        return bool(np.isfinite(r2) and r2 > best)
    return True


class BestValid:
    """Model selection on the validation split: stands in front of the loop's evaluator and keeps
    a copy of the weights whenever the validation R² is the best so far."""

    def __init__(self, evaluator, best: float = -np.inf, state: dict | None = None, step_offset: int = 0) -> None:
        self.evaluator, self.best, self.state, self.best_step = evaluator, best, state, 0
        self.step_offset = step_offset

    def __call__(self, model, step: int, sink) -> dict[str, float]:
        m = self.evaluator(model, step, sink)
        r2 = m.get("valid_r2", float("nan"))
        if self.state is None or improves(r2, self.best):
            self.best, self.best_step = r2, step + self.step_offset
            self.state = {k: v.detach().clone() if hasattr(v, "detach") else copy.deepcopy(v)
                          for k, v in model.state_dict().items()}
        return m
