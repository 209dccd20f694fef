import numpy as np
import pytest

from conftest import simple_session
from data_service import intervals as iv
from data_service.session import interval_array
from data_service.splits import SplitConfig, label_support, make_splits


def assert_valid_splits(s, gap):
    for a, b in [("train", "valid"), ("train", "test"), ("valid", "test")]:
        assert iv.total(iv.intersect(s.intervals[a], s.intervals[b])) <= 1e-9
    held = iv.union(s.intervals["valid"], s.intervals["test"])
    assert iv.total(iv.intersect(s.intervals["train"], iv.dilate(held, gap - 1e-9))) <= 1e-9
    assert iv.total(iv.intersect(held, label_support(s))) == pytest.approx(iv.total(held))


def test_trial_splits_hold_out_whole_trials_with_a_gap():
    s = simple_session(duration=600.0)
    make_splits(s, SplitConfig(gap_s=1.5))
    assert s.split_info["method"] == "trials"
    trials = s.intervals["trials"]
    for name, frac in (("valid", 0.1), ("test", 0.2)):
        rows = s.intervals[name]
        assert all(tuple(r) in {tuple(t) for t in trials} for r in rows)  # whole trials, nothing else
        assert len(rows) == pytest.approx(frac * len(trials), abs=4)  # runs of ~20 s = ~3-4 trials
    # held out in runs of consecutive trials, so the gap costs train little
    held = {tuple(r) for r in np.concatenate([s.intervals["valid"], s.intervals["test"]])}
    runs = np.diff([i for i, t in enumerate(trials) if tuple(t) in held])
    assert np.mean(runs == 1) > 0.6
    assert iv.total(s.intervals["train"]) > 0.6 * 600.0
    assert_valid_splits(s, 1.5)


def test_time_block_splits_only_where_behaviour_exists():
    s = simple_session(duration=1000.0)
    del s.intervals["trials"]
    b = s.behaviour["hand_vel"]
    keep = b.timestamps >= 400.0  # behaviour tracked only in the second part, as in the NWB mouse file
    b.timestamps, b.values = b.timestamps[keep], b.values[keep]
    make_splits(s)
    assert s.split_info["method"] == "time_blocks"
    assert s.intervals["valid"].min() >= 400.0 and s.intervals["test"].min() >= 400.0
    assert np.allclose(s.intervals["eval"], [[400.0, 1000.0]], atol=0.02)
    total = iv.total(label_support(s))
    assert iv.total(s.intervals["test"]) == pytest.approx(0.2 * total, rel=0.1)
    assert iv.total(s.intervals["train"]) > 400.0  # the unlabelled part stays in train
    assert_valid_splits(s, 1.0)


def test_splits_are_seeded_per_session():
    a, b = simple_session("x", duration=600.0), simple_session("x", duration=600.0)
    make_splits(a)
    make_splits(b)
    assert np.array_equal(a.intervals["test"], b.intervals["test"])
    c = simple_session("y", duration=600.0)
    make_splits(c)
    assert not np.array_equal(a.intervals["test"], c.intervals["test"])
    d = simple_session("x", duration=600.0)
    make_splits(d, SplitConfig(seed=1))
    assert not np.array_equal(a.intervals["test"], d.intervals["test"])


def test_source_splits_are_kept_or_completed():
    s = simple_session(duration=300.0)
    s.intervals.update(train=interval_array([0], [100]), valid=interval_array([101], [200]),
                       test=interval_array([201], [300]))
    make_splits(s)
    assert s.split_info == {"method": "source"} and np.allclose(s.intervals["valid"], [[101, 200]])
    s = simple_session(duration=300.0)
    s.intervals.update(train=interval_array([0], [200]), test=interval_array([200], [300]))
    make_splits(s)
    assert s.split_info["method"] == "source+trials"
    assert np.allclose(s.intervals["test"], [[200, 300]])
    assert s.intervals["valid"].max() <= 200 and iv.total(s.intervals["valid"]) > 0
    assert_valid_splits(s, 1.0)
