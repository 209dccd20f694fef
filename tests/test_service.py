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


def test_a_data_actor_makes_the_index_from_intervals_read_once_and_opens_no_session(tmp_path, monkeypatch):
    """RayBatches reads the index's intervals once and hands them to its actors (a new process per
    Ray dataset): the index they make is the opened one, window for window, without a session
    opened; a corpus changed since the plan is still refused."""
    from data_service.errors import CorpusError
    from data_service.service import window_index
    from data_service.window_index import WindowIndex

    root = tmp_path / "c"
    synth_corpus(SynthConfig(sessions=3, subjects=2, minutes=1.0, min_units=10, max_units=20, seed=3), root)
    corpus = open_corpus(root)
    cfg = IndexConfig(window_s=1.0, sessions=corpus.session_ids[::-1][:2])  # a subset, out of corpus order
    opened = window_index(ServiceSpec(corpus=str(root), index=cfg, tokenizer=None))
    rows = WindowIndex.split_intervals(corpus, cfg)
    assert list(rows) == cfg.sessions

    def no_session(self, session_id):
        raise AssertionError(f"opened {session_id}")

    monkeypatch.setattr(type(corpus), "session", no_session)
    made = window_index(ServiceSpec(corpus=str(root), index=cfg, tokenizer=None, split_intervals=rows,
                                    index_fingerprint=opened.fingerprint))
    assert made is not opened and made.fingerprint == opened.fingerprint
    for b in (0, 1, 7, 40):  # 40 lies past the first epoch
        for rank in (0, 1):
            assert made.worker_windows(b, 8, rank, 2) == opened.worker_windows(b, 8, rank, 2)
    with pytest.raises(CorpusError, match="changed since the run was planned"):
        window_index(ServiceSpec(corpus=str(root), index=cfg, tokenizer=None, split_intervals=dict(rows),
                                 index_fingerprint="0" * 16))


def test_ahead_serves_in_order_raises_in_order_and_closes_its_source():
    """The thread that starts the next Ray dataset early (ahead.py): what the consumer sees is what
    the source yields, an error where it happened, and closing stops an endless source."""
    import itertools

    from data_service.ahead import Ahead

    assert list(Ahead(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield from range(5)
        raise ValueError("bad chunk")

    seen = []
    with pytest.raises(ValueError, match="bad chunk"):
        for x in Ahead(failing(), depth=2):
            seen.append(x)
    assert seen == list(range(5))

    closed = []

    def endless():
        try:
            yield from itertools.count()
        finally:
            closed.append(True)

    a = Ahead(endless(), depth=2)
    assert list(itertools.islice(iter(a), 10)) == list(range(10))
    a.close()
    assert closed == [True] and not a._thread.is_alive()
