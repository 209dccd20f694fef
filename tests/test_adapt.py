"""Adapting a trained model to a session it has never seen (pretrain/finetune/finetune.py): what trains, what
must stay bit-identical, which labels are used, the bad inputs refused before anything is
written, and the registry path around it (register without moving aliases, promote, pull,
decode from files only)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytest.importorskip("mlflow")

from conftest import REPO, simple_session  # noqa: E402

from data_service import intervals as iv  # noqa: E402
from data_service.errors import ConfigError, CorpusError  # noqa: E402
from data_service.reader import open_corpus  # noqa: E402
from data_service.splits import make_splits  # noqa: E402
from data_service.store import CorpusStore  # noqa: E402
from data_service.synth import SynthConfig, synth_corpus  # noqa: E402
from pretrain.finetune.config import FinetuneConfig  # noqa: E402
from pretrain.finetune.finetune import finetune
from pretrain.finetune.plan import plan_adaptation
from pretrain.run.config import load_config  # noqa: E402
from pretrain.run.export import export_checkpoint
from pretrain.run.train import train_in_process  # noqa: E402
from pretrain.tokens.labels import LabelBudget, labelled_intervals  # noqa: E402
from pretrain.tracking.registry import ModelNotFound, register  # noqa: E402

TINY = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 1, "self_heads": 2, "latents_per_step": 4}
HELD_OUT = "held"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model pretrained (3 steps) on two synthetic sessions, exported and registered; a
    third session of the same corpus is held out for adaptation."""
    from pretrain.run.plan import build_plan

    root = tmp_path_factory.mktemp("adapt")
    synth_corpus(SynthConfig(sessions=3, subjects=1, minutes=1.5, min_units=20, max_units=30, seed=4), root / "corpus")
    corpus = open_corpus(root / "corpus")
    ids = corpus.session_ids
    cfg = load_config(None, [f"data.corpus={root / 'corpus'}", "data.global_batch=4", "data.loader=local",
                             "train.steps=3", "train.eval_every=3", "train.checkpoint_every=3", "train.warmup_steps=1",
                             "cluster.cpus_per_worker=1", "train.warm_start.method=ridge",
                             f"data.sessions={json.dumps(ids[:2])}"])
    cfg.model_overrides = dict(TINY)
    res = train_in_process(build_plan(cfg), root / "pre")
    export = export_checkpoint(res.checkpoint, root / "export", {"corpus_fingerprint": corpus.fingerprint})
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    import mlflow

    run_id = mlflow.MlflowClient(tracking).create_run(
        mlflow.MlflowClient(tracking).create_experiment("t", artifact_location=(root / "art").as_uri())).info.run_id
    version, uri = register(tracking, run_id, export, "tiny", alias="pretrained")
    return {"root": root, "corpus": root / "corpus", "held": ids[2], "trained": ids[:2], "export": export,
            "tracking": tracking, "version": version, "uri": uri}


def ft(env, **kw) -> FinetuneConfig:
    base = dict(model=str(env["export"]), corpus=str(env["corpus"]), sessions=[env["held"]], steps=4, batch=4,
                eval_every=2, tracking_uri=env["tracking"], out=str(env["root"] / "ft"),
                cache=str(env["root"] / "cache"))
    base.update(kw)
    return FinetuneConfig(**base)


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    return set(torch.nonzero((a != b).any(1)).flatten().tolist())


# ---- label budgets ---------------------------------------------------------------------------------------
def test_label_budgets_parse_and_refuse_ambiguity():
    assert LabelBudget.parse("10%").fraction == pytest.approx(0.1)
    assert LabelBudget.parse("2m").seconds == 120 and LabelBudget.parse("90s").seconds == 90
    for bad, why in (("10", "ambiguous"), ("0%", "more than 0"), ("150%", "more than 100%"), ("ten", "expected")):
        with pytest.raises(ConfigError, match=why):
            LabelBudget.parse(bad)


def test_windows_span_sample_free_gaps_between_labelled_trials_only(tmp_path):
    """Sub-second BCI trials laid end to end with 1 s pauses (no samples in them): a 1 s window fits
    only across a pause. It may span one that holds no sample; never one that holds another's labels."""
    from data_service.session import TimeSeries
    from pretrain.tokens.labels import window_stretches

    s = simple_session("bci", duration=60.0, n_units=5)
    t = np.concatenate([np.arange(a, a + 0.5, 0.033) for a in np.arange(0.0, 60.0, 1.5)])  # 0.5 s trials, 1 s pauses
    s.behaviour["hand_vel"] = TimeSeries(t, np.stack([np.sin(t), np.cos(t)], 1), ["x", "y"], unit="cm/s")
    make_splits(s)
    with CorpusStore(tmp_path / "c") as st:
        st.add(s)
    r = open_corpus(tmp_path / "c").session("bci")
    pieces = iv.normalize(np.stack([np.arange(0.0, 9.0, 1.5), np.arange(0.0, 9.0, 1.5) + 0.5], 1))
    merged = window_stretches(r, pieces, 1.0)
    assert np.allclose(merged, [[0.0, 8.0]])  # every pause is sample-free: one stretch
    sparse = pieces[::2]  # trials 0, 2, 4: the pauses between them hold trials 1, 3 (samples not labelled)
    assert np.allclose(window_stretches(r, sparse, 1.0), sparse)


def test_labels_are_whole_trials_inside_train_seeded_and_nested(tmp_path):
    s = simple_session("s1", duration=300.0, n_units=10)
    make_splits(s)
    with CorpusStore(tmp_path / "c") as st:
        st.add(s)
    r = open_corpus(tmp_path / "c").session("s1")
    train, trials = iv.normalize(r.intervals["train"]), r.intervals["trials"]
    inside = trials[iv.inside_mask(trials, train)]
    small = labelled_intervals(r, LabelBudget.parse("20%"), seed=0, window_s=1.0)
    assert iv.total(iv.subtract(small, train)) == 0  # never outside the train split
    for a, b in small:  # unions of whole trials
        assert any(abs(a - t0) < 1e-9 for t0 in inside[:, 0]) and any(abs(b - t1) < 1e-9 for t1 in inside[:, 1])
    assert iv.total(small) >= 0.2 * iv.total(train) - 1e-6
    assert np.array_equal(small, labelled_intervals(r, LabelBudget.parse("20%"), seed=0, window_s=1.0))
    other = labelled_intervals(r, LabelBudget.parse("20%"), seed=1, window_s=1.0)
    assert not np.array_equal(small, other)
    big = labelled_intervals(r, LabelBudget.parse("50%"), seed=0, window_s=1.0)
    assert iv.total(iv.subtract(small, big)) == pytest.approx(0)  # a larger budget holds the smaller
    assert np.array_equal(labelled_intervals(r, LabelBudget.parse("100%"), 0, 1.0), train)
    with pytest.raises(CorpusError, match="more than the session's train split"):
        labelled_intervals(r, LabelBudget.parse("1h"), seed=0, window_s=1.0)
    s2 = simple_session("s2", duration=300.0, n_units=10)
    s2.intervals.pop("trials")
    make_splits(s2)
    with CorpusStore(tmp_path / "c") as st:
        st.add(s2)
    blocks = labelled_intervals(open_corpus(tmp_path / "c").session("s2"), LabelBudget.parse("30s"), 0, 1.0)
    assert 30 <= iv.total(blocks) <= 40  # blocks of 10 windows


# ---- what trains -------------------------------------------------------------------------------------------
def test_unit_id_changes_only_the_new_rows(env):
    r = finetune(ft(env, mode="unit-id", name="uid"), show_progress=False)
    src, out = tensors(env["export"]), tensors(r.export)
    vsrc = json.loads((env["export"] / "vocab.json").read_text())
    vout = json.loads((r.export / "vocab.json").read_text())
    n_old = len(vsrc["units"])
    assert vout["units"][:n_old] == vsrc["units"] and vout["sessions"][:2] == vsrc["sessions"]  # old rows kept
    new_units = open_corpus(env["corpus"]).session(env["held"]).unit_ids.tolist()
    assert vout["units"][n_old:] == new_units and vout["sessions"][2:] == [env["held"]]
    assert set(src) == set(out)
    for k in src:
        if k == "unit_emb.weight":
            assert torch.equal(out[k][:n_old], src[k])
            assert changed_rows(out[k][:n_old], src[k]) == set()
        elif k == "session_emb.weight":
            assert torch.equal(out[k][:2], src[k])
        else:
            assert torch.equal(out[k], src[k]), f"{k} changed under unit-id"
    assert np.isfinite(r.test_r2) and r.model_uri == str(r.export)
    plan = json.loads((r.export / "plan.json").read_text())
    assert plan["adapt"]["trainable"] == "new" and plan["sessions"] == [env["held"]]


def test_unit_id_then_full_unfreezes_the_shared_layers(env):
    r = finetune(ft(env, mode="unit-id-then-full", steps=4, unfreeze_after=2, name="uidf"), show_progress=False)
    src, out = tensors(env["export"]), tensors(r.export)
    n_old = src["unit_emb.weight"].shape[0]
    assert torch.equal(out["unit_emb.weight"][:n_old], src["unit_emb.weight"])  # other sessions' rows: untouched
    shared = [k for k in src if not k.startswith(("unit_emb", "session_emb"))]
    if r.best_step > 2:  # the model kept was from the full phase
        assert any(not torch.equal(out[k], src[k]) for k in shared)
    assert (env["root"] / "ft" / "uidf" / "phase1").is_dir()


def test_causal_finetune_learns_window_ends_only_and_is_scored_causally(env):
    """finetune --causal: the training queries are the last half of each window (the same
    windows otherwise), the model kept is chosen and scored by causal decoding, and it says so."""
    from data_service.service import build_batch
    from pretrain.decoding.evaluate import predict_session
    from pretrain.tracking.export import load_exported

    corpus = open_corpus(env["corpus"])
    plain, _ = plan_adaptation(ft(env, mode="full"), env["export"], corpus)
    causal, _ = plan_adaptation(ft(env, mode="full", causal=True), env["export"], corpus)
    tail = causal.tokenizer.geometry.window_s / 2
    assert causal.causal and not plain.causal and causal.run.data.augment.query_tail_s == tail
    a, b = build_batch(plain.service_spec(), 0, 0, 1), build_batch(causal.service_spec(), 0, 0, 1)
    assert a.positions.tolist() == b.positions.tolist()
    np.testing.assert_array_equal(a.data.unit_index, b.data.unit_index)  # the same spikes: the whole window
    window = causal.tokenizer.geometry.window_s
    assert len(b.data.output_time) and (b.data.output_time >= window - tail - 1e-6).all()
    assert (a.data.output_time < window - tail).any() and len(a.data.output_time) > len(b.data.output_time)
    with pytest.raises(ConfigError, match="--causal-tail"):
        ft(env, causal_tail_s=0.1)

    r = finetune(ft(env, mode="full", steps=2, causal=True, name="causal"), show_progress=False)
    model, tok = load_exported(r.export)
    reader = corpus.session(env["held"])
    assert r.per_session[env["held"]]["test"] == pytest.approx(predict_session(model, tok, reader, "test", causal=True).r2)
    assert r.per_session[env["held"]]["test"] != pytest.approx(predict_session(model, tok, reader, "test").r2)
    assert json.loads((r.export / "config.json").read_text())["provenance"]["causal_tail_s"] == tail
    assert "causal readout" in (r.export / "MODEL_CARD.md").read_text()

    # --causal-mask: the same weights masked by time; every sample of the window learned, scored causally
    masked, _ = plan_adaptation(ft(env, mode="full", causal_mask=True), env["export"], corpus)
    assert masked.causal and masked.model.causal and not plain.model.causal
    c = build_batch(masked.service_spec(), 0, 0, 1)
    assert c.data.output_time.tolist() == a.data.output_time.tolist()
    r = finetune(ft(env, mode="full", steps=2, causal_mask=True, name="masked"), show_progress=False)
    model, tok = load_exported(r.export)
    assert model.cfg.causal and json.loads((r.export / "config.json").read_text())["provenance"]["causal_mask"]
    assert r.per_session[env["held"]]["test"] == pytest.approx(predict_session(model, tok, reader, "test", causal=True).r2)


def test_training_settings_reach_the_adaptation_run(env):
    """`finetune --set train.KEY=VALUE`: the adaptation's own training settings (here LAMB's per-tensor trust,
    which needs ZeRO stage 0), applied after finetune's."""
    corpus = open_corpus(env["corpus"])
    plan, _ = plan_adaptation(ft(env, mode="full", train_settings=["train.optim.algo=lamb", "train.optim.trust=tensor",
                                                                   "train.zero_stage=0"]), env["export"], corpus)
    t = plan.run.train
    assert (t.optim.algo, t.optim.trust, t.zero_stage, t.steps) == ("lamb", "tensor", 0, 4)


def test_targets_are_normalised_by_the_labelled_part_and_round_trip_units(env, tmp_path):
    """The same session stored in m/s and in cm/s: targets equal, predictions equal up to 100x."""
    from pretrain.decoding.stitch import decode_session
    from pretrain.tracking.export import load_exported

    s = simple_session("x", duration=200.0, n_units=12)
    make_splits(s)
    cm = s.behaviour["hand_vel"]
    roots = {}
    for name, factor in (("cm", 1.0), ("m", 0.01)):
        s.behaviour["hand_vel"] = type(cm)(cm.timestamps, cm.values * factor, cm.columns, unit="cm/s",
                                            sampling_rate=cm.sampling_rate)
        with CorpusStore(tmp_path / name) as st:
            st.add(s)
        roots[name] = tmp_path / name
    plans = {k: plan_adaptation(ft(env, corpus=str(v), sessions=["x"], labels="50%"), env["export"],
                                open_corpus(v))[0] for k, v in roots.items()}
    st_cm, st_m = (plans[k].tokenizer.target_stats["x"]["hand_vel"] for k in ("cm", "m"))
    assert np.allclose(np.asarray(st_m.mean) * 100, st_cm.mean) and st_m.std * 100 == pytest.approx(st_cm.std)
    labelled = plans["cm"].index.intervals["x"]
    assert iv.total(labelled) < iv.total(open_corpus(roots["cm"]).session("x").intervals["train"])  # the labelled part
    model, _ = load_exported(env["export"])
    model.unit_emb.extend(s.unit_ids.tolist())
    model.session_emb.extend(["x"])
    out = {k: decode_session(model, plans[k].make_tokenizer(), open_corpus(roots[k]).session("x"))["velocity"]
           for k in roots}
    assert np.allclose(out["m"].values * 100, out["cm"].values, rtol=1e-4, atol=1e-4)


# ---- bad input: refused before anything is written ---------------------------------------------------------
def test_bad_inputs_are_refused_and_nothing_is_registered(env, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(env["tracking"])
    before = len(client.search_model_versions("name='tiny'"))
    cases = [
        (dict(sessions=[env["trained"][0]]), ConfigError, "already in the model's vocabulary"),
        (dict(sessions=["nope"]), CorpusError, "not in the corpus"),
        (dict(labels="10"), ConfigError, "ambiguous"),
        (dict(labels="0%"), ConfigError, "more than 0"),
        (dict(labels="3h"), CorpusError, "more than the session's train split"),
        (dict(model="models:/tiny@nope"), ModelNotFound, "no registered model 'tiny' with alias @nope"),
        (dict(model="models:/missing/3"), ModelNotFound, "no registered model 'missing'"),
        (dict(behaviours=["head_direction"]), CorpusError, "--behaviour head_direction: the session has no such"),
        (dict(train_settings=["data.global_batch=2"]), ConfigError, "only train.\\* settings"),
        (dict(train_settings=["train.optim.algo=lamb", "train.optim.trust=tensor"]), ConfigError, "zero_stage=0"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            finetune(ft(env, register="tiny", **kw), show_progress=False)
    with pytest.raises(ConfigError, match="unit-id-then-full only"):
        ft(env, unfreeze_after=2)
    s = simple_session("nobeh", duration=60.0, n_units=8)
    s.behaviour = {}
    make_splits(s)
    with CorpusStore(tmp_path / "c") as st:
        st.add(s)
    with pytest.raises(CorpusError, match="no behaviour the model decodes"):
        finetune(ft(env, corpus=str(tmp_path / "c"), sessions=["nobeh"], register="tiny"), show_progress=False)
    assert len(client.search_model_versions("name='tiny'")) == before


# ---- registry: versions, aliases, pull, decode ------------------------------------------------------------
def test_register_moves_no_alias_unless_asked_and_promote_does(env):
    import mlflow

    from pretrain.tracking.registry import promote, versions

    r = finetune(ft(env, register="tiny", name="reg"), show_progress=False)
    client = mlflow.MlflowClient(env["tracking"])
    new = r.model_uri.rsplit("/", 1)[1]
    assert new != env["version"]
    assert str(client.get_model_version_by_alias("tiny", "pretrained").version) == env["version"]  # not moved
    tags = client.get_model_version("tiny", new).tags
    assert tags["kind"] == "finetuned" and tags["source_model"] == str(env["export"].resolve())
    assert promote(env["tracking"], "tiny", new, "pretrained") == env["version"]
    rows, aliases = versions(env["tracking"], "tiny")
    assert aliases["pretrained"] == new and [x["version"] for x in rows][-1] == new
    promote(env["tracking"], "tiny", env["version"], "pretrained")  # back, for the other tests
    with pytest.raises(ModelNotFound):
        promote(env["tracking"], "tiny", "99", "pretrained")


def test_pull_and_decode_reproduce_evaluate_without_the_pyfunc(env, tmp_path):
    """A finetuned model registered, then pulled and decoded in a fresh process that must not
    import the MLflow pyfunc module; its predictions equal evaluate's on the scored samples."""
    from pretrain.decoding.evaluate import predict_session
    from pretrain.tracking.export import load_exported

    r = finetune(ft(env, register="tiny", name="pull"), show_progress=False)
    model, tok = load_exported(r.export)
    reader = open_corpus(env["corpus"]).session(env["held"])
    ev = predict_session(model, tok, reader, "test")
    out = tmp_path / "pred.csv"
    code = (
        "import sys; from popscale.cli import main; "
        f"rc = main(['decode', '--model', '{r.model_uri}', '--corpus', '{env['corpus']}', '--session', "
        f"'{env['held']}', '--split', 'test', '--out', '{out}', '--tracking-uri', '{env['tracking']}', '--cache', '{tmp_path / 'c'}']); "
        "assert 'pretrain.tracking.pyfunc' not in sys.modules, 'the pyfunc module was imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "pred.png").exists() and len(list((tmp_path / "c").glob("*/tiny/*/registered.json"))) == 1
    pulled = next((tmp_path / "c").glob("*/tiny/*"))
    assert {"model.safetensors", "config.json", "vocab.json", "plan.json", "MODEL_CARD.md"} <= {p.name for p in pulled.iterdir()}
    prov = json.loads((pulled / "config.json").read_text())["provenance"]
    assert prov["git_commit"] and prov["packages"]["torch"] and prov["corpus_fingerprint"] and prov["source_model"]
    assert "Intended use" in (pulled / "MODEL_CARD.md").read_text()
    rows = np.loadtxt(out, delimiter=",", skiprows=1, usecols=(2, 3, 4))
    at = {round(t, 6): v for t, *v in rows}
    got = np.array([at[round(t, 6)] for t in ev.times])
    np.testing.assert_allclose(got, ev.prediction, rtol=1e-4, atol=1e-5)


def test_decode_refuses_a_recording_the_model_does_not_know(env, tmp_path):
    from popscale.cli import main

    rc = main(["decode", "--model", str(env["export"]), "--corpus", str(env["corpus"]), "--session", env["held"],
               "--out", str(tmp_path / "p.csv")])
    assert rc == 1 and not (tmp_path / "p.csv").exists()


# ---- readout kinds ------------------------------------------------------------------------------------------
def _kinds_session(tmp_path):
    """A session with a continuous, an angular (one column of three, radians) and a categorical behaviour."""
    from data_service.session import TimeSeries

    s = simple_session("k", duration=120.0, n_units=12)
    t = s.behaviour["hand_vel"].timestamps
    angle = np.mod(t * 0.7, 2 * np.pi)
    s.behaviour["compass"] = TimeSeries(t, np.stack([np.zeros_like(t), angle, np.ones_like(t)], 1), ["rx", "ry", "rz"],
                                        unit="radian", sampling_rate=100.0)
    s.behaviour["target_id"] = TimeSeries(t, (np.floor(t / 6.0) % 4)[:, None], ["id"], unit="class",
                                          sampling_rate=100.0)
    s.behaviour["position"] = TimeSeries(t, np.stack([np.sin(t), 5 + 0 * t, 3 * np.cos(t)], 1), ["x", "y", "z"],
                                         unit="cm", sampling_rate=100.0)  # a 3-D position whose y never moves
    make_splits(s)
    with CorpusStore(tmp_path / "k") as st:
        st.add(s)
    return tmp_path / "k", angle


def test_angular_and_categorical_readouts_train_and_score(tmp_path):
    from pretrain.decoding.evaluate import predict_session
    from pretrain.model.loss import weighted_mse
    from pretrain.run.build import build_model
    from pretrain.run.plan import build_plan

    root, _ = _kinds_session(tmp_path)
    cfg = load_config(None, [f"data.corpus={root}", "data.global_batch=4", "data.loader=local", "train.steps=3",
                             "train.eval_every=3", "train.checkpoint_every=3", "train.warmup_steps=1",
                             "cluster.cpus_per_worker=1", "train.warm_start.method=ridge",
                             "data.readouts={velocity: [hand_vel], heading: [compass], target: [target_id], "
                             "pos: [position]}",
                             "data.readout_kinds={heading: angular, target: categorical}",
                             "data.readout_columns={heading: ry, pos: 'z,x'}"])
    cfg.model_overrides = {**TINY, "readouts": {"velocity": 2, "heading": 2, "target": 4, "pos": 2}}
    plan = build_plan(cfg)
    assert set(plan.tokenizer.target_stats["k"]) == {"hand_vel", "position"}  # angles and classes are not rescaled
    assert len(plan.tokenizer.target_stats["k"]["position"].mean) == 2  # stats of the chosen columns (y is constant)
    tok = plan.make_tokenizer()
    r = open_corpus(root).session("k")
    w = r.read_window(10.0, 11.0)
    b = tok.pack([(w, r, None)])
    ang = b.target[b.output_readout == 1][:, :2]
    want = w.behaviour["compass"].values[:, 1]
    assert np.allclose(ang, np.stack([np.cos(want), np.sin(want)], 1), atol=1e-6)  # (cos, sin) of column ry
    assert np.array_equal(b.target[b.output_readout == 2][:, 0], w.behaviour["target_id"].values[:, 0])
    st = plan.tokenizer.target_stats["k"]["position"]
    pos = (w.behaviour["position"].values[:, [2, 0]] - np.asarray(st.mean)) / (st.std / plan.tokenizer.target_rms)
    assert np.allclose(b.target[b.output_readout == 3][:, :2], pos, atol=1e-5)  # columns z, x in that order
    model = build_model(plan)
    loss, per = weighted_mse(model(b.to("cpu")), b.to("cpu"), model.readout_names, [x.kind for x in tok.cfg.readouts])
    assert per["target"] > 1.0  # cross-entropy of 4 classes near chance (~log 4), not an MSE on ids
    res = train_in_process(plan, tmp_path / "ckpt")
    assert np.isfinite(res.metrics["valid_r2"])
    scored = predict_session(res.model, tok, r, "valid")
    assert set(scored.per_behaviour) == {"hand_vel", "compass", "target_id", "position"}
    assert 0.0 <= scored.per_behaviour["target_id"] <= 1.0  # an accuracy
    bad = load_config(None, [f"data.corpus={root}", "data.readouts={target: [hand_vel]}",
                             "data.readout_kinds={target: categorical}"])
    bad.model_overrides = {**TINY, "readouts": {"target": 4}}
    with pytest.raises(CorpusError, match="not class ids"):
        build_plan(bad)
    three = load_config(None, [f"data.corpus={root}", "data.readouts={pos: [position]}"])
    three.model_overrides = {**TINY, "readouts": {"pos": 2}}
    with pytest.raises(Exception, match="readout_columns|constant in the train split"):  # 3 columns for 2 dims
        build_plan(three).make_tokenizer().layout(r)


def test_unit_id_with_a_new_readout_changes_only_new_rows_and_the_new_head(env):
    r = finetune(ft(env, mode="unit-id", name="newhead", readouts=["position:continuous:2=hand_pos"]),
                 show_progress=False)
    src, out = tensors(env["export"]), tensors(r.export)
    n_old = src["unit_emb.weight"].shape[0]
    assert set(out) - set(src) == {"readouts.position.weight", "readouts.position.bias", "readout_emb.weight"}
    for k in src:
        ref = out[k][: src[k].shape[0]] if k in ("unit_emb.weight", "session_emb.weight") else out[k]
        assert torch.equal(ref, src[k]), f"{k} changed"
    assert torch.equal(out["readout_emb.weight"][0], torch.zeros_like(out["readout_emb.weight"][0]))  # old readout as it was
    assert changed_rows(out["unit_emb.weight"][n_old:], torch.zeros_like(out["unit_emb.weight"][n_old:]))
    cfg = json.loads((r.export / "config.json").read_text())
    assert cfg["model"]["readouts"] == {"velocity": 2, "position": 2}
    with pytest.raises(ConfigError, match="NAME:KIND:DIMS"):
        ft(env, readouts=["position=hand_pos"])


def test_the_commands_finetune_then_decode_an_nwb_file(env, tmp_path, capsys):
    """The user path on a file: ingest an NWB, `popscale finetune` it (RESULT line), then `popscale
    decode --input` the same file; a file without units is refused, nothing written."""
    from conftest import nlb_style_nwb, result_line

    from data_service.ingest import ingest
    from data_service.ingest.common import IngestOptions
    from popscale.cli import main

    nwb = nlb_style_nwb(tmp_path / "rec.nwb")
    assert ingest([nwb], tmp_path / "mine", lambda p: IngestOptions()).ok
    sid = open_corpus(tmp_path / "mine").session_ids[0]
    capsys.readouterr()
    rc = main(["finetune", "--model", str(env["export"]), "--corpus", str(tmp_path / "mine"), "--session", sid,
               "--labels", "50%", "--steps", "2", "--eval-every", "1", "--tracking-uri", env["tracking"],
               "--out", str(tmp_path / "ft"), "--no-progress"])
    res = result_line(capsys.readouterr().out)
    assert rc == 0 and {"test_r2", "valid_r2", "model_uri", "seconds"} <= set(res)
    assert main(["decode", "--model", res["model_uri"], "--input", str(nwb), "--out", str(tmp_path / "p.csv")]) == 0
    rows = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1, usecols=(2, 3, 4))
    assert len(rows) > 1000 and np.isfinite(rows).all()
    bad = nlb_style_nwb(tmp_path / "nounits.nwb", with_units=False)
    assert main(["decode", "--model", res["model_uri"], "--input", str(bad), "--out", str(tmp_path / "q.csv")]) == 1
    assert "no units table" in capsys.readouterr().err and not (tmp_path / "q.csv").exists()
