"""The data service's augmentation: time scaling (unit dropout is exercised by the tokenizer and
pretraining tests)."""

from __future__ import annotations

import numpy as np
import pytest

from data_service.augment import AugmentConfig, rate_factor
from data_service.reader import open_corpus
from data_service.service import ServiceSpec, read_window
from data_service.synth import SynthConfig, synth_corpus
from data_service.window_index import IndexConfig, WindowRef
from pretrain.model.config import preset
from pretrain.model.poyo import POYO
from pretrain.tokens.tokenizer import Tokenizer, TokenizerConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc") / "c"
    synth_corpus(SynthConfig(sessions=1, subjects=1, minutes=1.0, min_units=20, max_units=40, seed=2), root)
    c = open_corpus(root)
    return c, POYO(preset("poyo-1.3M"), c.session(c.session_ids[0]).unit_ids, c.session_ids)


def test_time_scaling_squeezes_times_and_scales_rates(setup):
    """A window time-scaled by s holds s seconds of data in one: spike and behaviour times are
    divided by s, velocities (cm/s) multiplied by s, positions (cm) unchanged."""
    c, model = setup
    r = c.session(c.session_ids[0])
    cfg = preset("poyo-1.3M", readouts={"velocity": 2, "position": 2})
    tok = Tokenizer(TokenizerConfig.build(cfg, behaviours={"velocity": ["hand_vel"], "position": ["hand_pos"]}),
                    model.unit_emb, model.session_emb)
    spec = ServiceSpec(corpus=str(c.root), index=IndexConfig(), tokenizer=tok,
                       augment=AugmentConfig(time_scaling=(1.5, 1.5)))
    w = read_window(spec, r, WindowRef(position=7, epoch=0, session=r.session_id, t_start=10.0), 1.0)
    raw = r.read_window(10.0, 11.5)
    assert np.allclose(w.spike_times, raw.spike_times / 1.5) and w.spike_times.max() < 1.0
    assert np.array_equal(w.spike_units, raw.spike_units)
    assert np.allclose(w.behaviour["hand_vel"].values, raw.behaviour["hand_vel"].values * 1.5)
    assert np.allclose(w.behaviour["hand_pos"].values, raw.behaviour["hand_pos"].values)
    assert np.allclose(w.behaviour["hand_vel"].timestamps, raw.behaviour["hand_vel"].timestamps / 1.5)
    assert rate_factor("cm/s", 2.0) == 2.0 and rate_factor("m/s^2", 2.0) == 4.0 and rate_factor("cm", 2.0) == 1.0
