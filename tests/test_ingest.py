"""Every ingest path on real files, with round trips: ingest -> read window -> the source's spikes."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import scipy.io
from conftest import REPO, nlb_style_nwb

from data_service import intervals as iv
from data_service.ingest import detect_format, ingest, read_sessions
from data_service.ingest.common import IngestOptions, load_metadata_file, options_for
from data_service.reader import Corpus

META = load_metadata_file(REPO / "configs" / "real_recordings.yaml")


def opts(path, **kw):
    return options_for(path, IngestOptions(), META, kw)


def ingest_one(path, tmp_path, **kw):
    root = tmp_path / "corpus"
    report = ingest([path], root, lambda p: opts(p, **kw))
    assert report.ok, report.failures
    return Corpus(root)


def check_splits(c: Corpus, sid: str, gap: float = 1.0):
    s = c.session(sid)
    ivs = s.intervals
    for a, b in [("train", "valid"), ("train", "test"), ("valid", "test")]:
        assert iv.total(iv.intersect(ivs[a], ivs[b])) <= 1e-9
    held = iv.union(ivs["valid"], ivs["test"])
    # no training time within `gap` of held-out time
    assert iv.total(iv.intersect(ivs["train"], iv.dilate(held, gap - 1e-9))) == pytest.approx(0.0, abs=1e-9)
    for k in ("train", "valid", "test"):
        assert iv.total(ivs[k]) > 0, k


def test_nwb_round_trip(tmp_path, real_dir):
    import pynwb

    path = real_dir / "mouse_A2929-200711.nwb"
    assert detect_format(path) == "nwb"
    c = ingest_one(path, tmp_path)
    (sid,) = c.session_ids
    s = c.session(sid)
    assert sid == "A2929-200711" and s.attrs["subject"] == "A2929" and s.attrs["species"] == "Mus musculus"
    assert c.rows[sid]["n_units"] == 15 and c.rows[sid]["n_spikes"] == 98_794
    assert set(s.unit_areas) == {"adn", "ca1"}
    assert all(u.startswith("A2929/A2929-200711/") for u in s.unit_ids)
    assert s.attrs["timing_resolution_s"] is None
    assert sorted(s.behaviour_names) == ["compass_direction", "position"]
    assert s.attrs["behaviour"]["compass_direction"]["columns"] == ["rx", "ry", "rz"]
    assert {"epochs", "epoch_sleep", "epoch_wake", "sleep_ripples"} <= set(s.intervals)
    assert len(s.intervals["sleep_ripples"]) == 594
    assert np.allclose(s.intervals["epoch_wake"], [[600.0, 1200.0]])
    check_splits(c, sid)
    # held-out data are drawn where behaviour exists (tracking covers 670.6-1200 s only)
    assert s.intervals["valid"].min() >= 670.0 and s.intervals["test"].min() >= 670.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pynwb.NWBHDF5IO(str(path), "r") as io:
            nwb = io.read()
            by_unit = {f"A2929/A2929-200711/{nwb.units.id[i]}": np.asarray(nwb.units["spike_times"][i])
                       for i in range(len(nwb.units))}
            pos_t = np.asarray(nwb.acquisition["Position"].spatial_series["x"].timestamps[:])
            pos_x = np.asarray(nwb.acquisition["Position"].spatial_series["x"].data[:])
    rng = np.random.default_rng(0)
    for t0 in np.concatenate([rng.uniform(0, 1199, 40), [0.0, 670.0, 1199.5]]):
        w = s.read_window(t0, t0 + 1.0)
        for k, uid in enumerate(s.unit_ids):
            src = by_unit[uid]
            want = src[(src >= t0) & (src < t0 + 1.0)] - t0
            assert np.array_equal(w.spike_times[w.spike_units == k], want)
        m = (pos_t >= t0) & (pos_t < t0 + 1.0)
        assert np.array_equal(w.behaviour["position"].values[:, 0], pos_x[m])


@pytest.mark.parametrize("name,n_units,n_spikes,width", [
    ("m1_stevenson_2011.mat", 171, 2_352_815, 0.05),
    ("s1_data.mat", 52, 842_910, 0.05),
])
def test_binned_mat_round_trip(tmp_path, real_dir, name, n_units, n_spikes, width):
    path = real_dir / name
    c = ingest_one(path, tmp_path)
    (sid,) = c.session_ids
    s = c.session(sid)
    assert c.rows[sid]["n_units"] == n_units and c.rows[sid]["n_spikes"] == n_spikes
    assert s.attrs["timing_resolution_s"] == pytest.approx(width)
    assert any("placed uniformly at random" in n for n in s.attrs["notes"])
    assert s.attrs["behaviour"]["hand_vel"]["columns"] == ["x", "y"]  # the all-zero third row is dropped
    check_splits(c, sid)
    d = scipy.io.loadmat(path)
    counts = d["spikes"].T if name.startswith("m1") else d["spikes"]  # -> bins x units
    starts = d["time"].ravel() if "time" in d else np.arange(counts.shape[0]) * width
    t, u = s.spikes()
    assert np.array_equal(np.bincount(u, minlength=n_units), counts.sum(axis=0))
    if "time" not in d:  # a regular grid: every bin's counts come back exactly
        b = np.searchsorted(starts, t, side="right") - 1
        back = np.zeros_like(counts, dtype=np.int64)
        np.add.at(back, (b, u), 1)
        assert np.array_equal(back, counts)
    vel = d["handVel"][:2].T if "handVel" in d else d["vel"]
    assert np.array_equal(s.behaviour("hand_vel")[1], vel)


def test_dad_layouts(tmp_path, real_dir):
    c = ingest_one(real_dir / "chewie_demo.mat", tmp_path / "a")
    assert c.session_ids == ["chewie_demo"]
    s = c.session("chewie_demo")
    d = scipy.io.loadmat(real_dir / "chewie_demo.mat")
    assert c.rows["chewie_demo"]["n_spikes"] == int(d["Ytr"].sum() + d["Yte"].sum())
    assert s.attrs["timing_resolution_s"] == 0.2
    # the file's own parts: train within Ytr's span, test = Yte's span, valid carved from train trials
    cut = d["Ytr"].shape[0] * 0.2
    assert s.intervals["train"].max() <= cut and np.allclose(s.intervals["test"], [[cut, 3018 * 0.2]])
    assert s.intervals["valid"].max() <= cut and iv.total(s.intervals["valid"]) > 0
    assert s.attrs["split"]["method"] == "source+trials"
    check_splits(c, "chewie_demo")

    c = ingest_one(real_dir / "mihi_demo.mat", tmp_path / "b")
    assert c.session_ids == ["mihi_demo-te", "mihi_demo-tr"]  # different units: two sessions
    m = scipy.io.loadmat(real_dir / "mihi_demo.mat")
    for sid, key in [("mihi_demo-tr", "Ytr"), ("mihi_demo-te", "Yte")]:
        s = c.session(sid)
        assert s.attrs["timing_resolution_s"] == pytest.approx(0.2)  # rates on a 5 Hz quantum
        t, u = s.spikes()
        counts = np.round(m[key] / 5).astype(int)
        b = np.searchsorted(np.arange(counts.shape[0]) * 0.2, t, side="right") - 1
        back = np.zeros_like(counts)
        np.add.at(back, (b, u), 1)
        assert np.array_equal(back, counts)
        assert len(s.intervals["trials"]) > 10
        check_splits(c, sid)


def test_temporaldata_file_written_by_temporaldata(tmp_path):
    td = pytest.importorskip("temporaldata")
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 100, 20_000))
    u = rng.integers(0, 40, len(t))
    ct = np.arange(0, 100, 0.01)
    vel = rng.normal(size=(len(ct), 2))
    trial_start = np.arange(0, 95, 5.0)
    data = td.Data(
        spikes=td.IrregularTimeSeries(timestamps=t, unit_index=u, domain="auto"),
        units=td.ArrayDict(id=np.array([f"elec{i}" for i in range(40)]),
                           brain_region=np.array(["M1"] * 30 + ["PMd"] * 10)),
        cursor=td.IrregularTimeSeries(timestamps=ct, vel=vel, pos=np.cumsum(vel, 0) * 0.01, domain="auto"),
        trials=td.Interval(start=trial_start, end=trial_start + 4.0),
        train_domain=td.Interval(start=np.array([0.0]), end=np.array([70.0])),
        valid_domain=td.Interval(start=np.array([71.0]), end=np.array([80.0])),
        test_domain=td.Interval(start=np.array([81.0]), end=np.array([100.0])),
        session=td.Data(id="monkey_c_2016_10_13"), subject=td.Data(id="monkey_c", species="macaca_mulatta"),
        brainset="perich_miller_2018", domain=td.Interval(start=np.array([0.0]), end=np.array([100.0])),
    )
    path = tmp_path / "rec.h5"
    with h5py.File(path, "w") as f:
        data.to_hdf5(f)
    assert detect_format(path) == "temporaldata"
    (s,) = read_sessions(path, IngestOptions())
    assert s.session_id == "monkey_c_2016_10_13" and s.subject == "monkey_c" and s.species == "macaca_mulatta"
    assert list(s.unit_areas[:30]) == ["M1"] * 30 and s.unit_ids[0] == "monkey_c/monkey_c_2016_10_13/elec0"
    assert s.split_info == {"method": "source"}
    assert np.allclose(s.intervals["valid"], [[71.0, 80.0]])
    assert any("perich_miller_2018" in n for n in s.notes)
    c = ingest_one(path, tmp_path)
    r = c.session("monkey_c_2016_10_13")
    assert sorted(r.behaviour_names) == ["cursor_pos", "cursor_vel"]
    for t0 in rng.uniform(0, 99, 30):
        w = r.read_window(t0, t0 + 1.0)
        ref = data.slice(t0, t0 + 1.0)
        assert np.array_equal(w.spike_times, ref.spikes.timestamps)
        assert np.array_equal(w.spike_units, ref.spikes.unit_index)
        assert np.array_equal(w.behaviour["cursor_vel"].values, ref.cursor.vel)


def test_ingest_is_deterministic(tmp_path, real_dir):
    a = ingest_one(real_dir / "chewie_demo.mat", tmp_path / "a")
    b = ingest_one(real_dir / "chewie_demo.mat", tmp_path / "b")
    assert a.rows["chewie_demo"]["content_hash"] == b.rows["chewie_demo"]["content_hash"]
    c = ingest_one(real_dir / "chewie_demo.mat", tmp_path / "c", seed=1)
    assert c.rows["chewie_demo"]["content_hash"] != a.rows["chewie_demo"]["content_hash"]


def test_matlab_v73_files_are_read_through_hdf5(tmp_path):
    path = tmp_path / "v73.mat"
    counts = np.random.default_rng(0).poisson(1.0, (200, 5)).astype(np.float64)
    # MAT v7.3 = HDF5 with a 512-byte user block holding the MATLAB header; variables come transposed
    with h5py.File(path, "w", userblock_size=512) as h:
        h["spikes"] = counts  # (bins x units) on disk = (units x bins) in MATLAB's order
        h["time"] = (np.arange(200) * 0.05)[:, None]
        h["handVel"] = np.ones((2, 200))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(128, b" "))
    assert detect_format(path) == "mat"
    (s,) = read_sessions(path, IngestOptions())
    assert len(s.spike_times) == int(counts.sum()) and s.n_units == 5


def test_nwb_plain_timeseries_in_the_behavior_module_are_ingested(tmp_path):
    from data_service.ingest import ingest
    from data_service.ingest.common import IngestOptions
    from data_service.reader import open_corpus

    src = nlb_style_nwb(tmp_path / "nlb.nwb")
    report = ingest([src], tmp_path / "c", lambda p: IngestOptions(subject="m", session_id="nlb"))
    assert report.ok, report.failures
    r = open_corpus(tmp_path / "c").session("nlb")
    assert set(r.behaviour_names) >= {"hand_vel", "cursor_pos"}
    assert r.attrs["behaviour"]["hand_vel"]["unit"] == "mm/s" and len(r.attrs["behaviour"]["hand_vel"]["columns"]) == 2
    t, v = r.behaviour("hand_vel")
    assert np.allclose(v[:, 0], np.sin(t) * 100, atol=1e-4)


def test_nwb_without_units_is_refused_by_name(tmp_path):
    from data_service.ingest import ingest
    from data_service.ingest.common import IngestOptions

    src = nlb_style_nwb(tmp_path / "nounits.nwb", with_units=False)
    report = ingest([src], tmp_path / "c", lambda p: IngestOptions(subject="m"))
    assert not report.ok and "no units table" in report.failures[0][1] and "nounits.nwb" in report.failures[0][1]
