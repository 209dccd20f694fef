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


@pytest.mark.parametrize("given", [(), ("train",), ("valid",), ("test",), ("train", "valid"), ("train", "test"),
                                   ("valid", "test"), ("train", "valid", "test")])
@pytest.mark.parametrize("trials", [True, False])
def test_no_split_overlaps_another_whatever_the_source_gives(given, trials):
    """A carved split never overlaps one the source gave (a carved valid used to be drawn from a
    pool that still held the source's test split)."""
    s = simple_session(duration=600.0)
    if not trials:
        del s.intervals["trials"]
    source = {"train": interval_array([0, 400], [250, 450]), "valid": interval_array([260], [330]),
              "test": interval_array([340, 460], [390, 600])}
    s.intervals.update({k: source[k] for k in given})
    make_splits(s, SplitConfig(gap_s=2.0))
    for k in given:  # what the source gave is kept (its train split only loses what is carved from it)
        if k == "train" and len(given) < 3:
            assert iv.total(iv.subtract(s.intervals[k], source[k])) <= 1e-9
        else:
            assert np.allclose(s.intervals[k], source[k])
    for a, b in [("train", "valid"), ("train", "test"), ("valid", "test")]:
        assert iv.total(iv.intersect(s.intervals[a], s.intervals[b])) <= 1e-9, (a, b)
    carved = [k for k in ("valid", "test") if k not in given]
    for k in carved:
        assert iv.total(s.intervals[k]) > 0
        for o in (o for o in ("valid", "test") if o in given):  # the gap kept from a split the source gave
            assert iv.total(iv.intersect(s.intervals[k], iv.dilate(s.intervals[o], 2.0 - 1e-9))) <= 1e-9
    if "train" not in given:
        held = iv.union(s.intervals["valid"], s.intervals["test"])
        assert iv.total(iv.intersect(s.intervals["train"], iv.dilate(held, 2.0 - 1e-9))) <= 1e-9


def test_frozen_tracking_is_not_scored_or_held_out():
    """A sleep box out of the camera's view: position repeats one value for minutes. It is no label:
    eval and held-out data leave it out (train keeps it as unlabelled time)."""
    s = simple_session(duration=600.0)
    del s.intervals["trials"]
    b = s.behaviour["hand_vel"]
    frozen = b.timestamps >= 400.0
    b.values[frozen] = b.values[np.flatnonzero(frozen)[0]]
    make_splits(s)
    assert iv.total(iv.intersect(s.intervals["eval"], interval_array([400.5], [600]))) == 0
    for k in ("valid", "test"):
        assert s.intervals[k].max() <= 400.5 and iv.total(s.intervals[k]) > 0
    assert iv.total(s.intervals["test"]) == pytest.approx(0.2 * 400, rel=0.15)
    # a label constant by design (a target id per trial) is not "frozen"
    from data_service.splits import frozen_runs

    t = np.arange(0, 100, 0.1)
    assert len(frozen_runs(t, np.repeat(np.arange(10), 100)[:, None])) == 0
    assert len(frozen_runs(t, np.where(t < 50, np.sin(t), 0.0)[:, None])) == 1


def test_eval_intervals_confine_scoring_and_held_out_data_and_few_trials_give_blocks():
    """A T-maze day: a 400 s task between rests, 10 short trials. Held-out data come from the task
    (eval_intervals) and, the trials covering little of it, as blocks of time: a test set of ~20 %
    of the task, not of the trials."""
    s = simple_session(duration=1000.0)
    s.intervals["epoch_task"] = interval_array([300], [700])
    s.intervals["trials"] = interval_array(300 + 40 * np.arange(10), 300 + 40 * np.arange(10) + 5)
    make_splits(s, SplitConfig(eval_intervals="epoch_task"))
    assert np.allclose(s.intervals["eval"], [[300, 700]], atol=0.02)
    assert s.split_info["method"] == "time_blocks"
    held = iv.union(s.intervals["valid"], s.intervals["test"])
    assert held.min() >= 300 and held.max() <= 700
    assert iv.total(s.intervals["test"]) == pytest.approx(80, rel=0.2)
    assert_valid_splits(s, 1.0)
    with pytest.raises(Exception, match="epoch_task"):
        make_splits(simple_session(duration=100.0), SplitConfig(eval_intervals="epoch_task"))
