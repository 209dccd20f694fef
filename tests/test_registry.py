"""Exported models: plain files that reload with their tokenizer, in today's format and the one
written before the run plan (format 1: the window in the model config, a flat tokenizer config)."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import simple_session

from data_service.reader import open_corpus
from data_service.splits import make_splits
from data_service.store import CorpusStore
from pretrain.model.config import ModelConfig
from pretrain.model.poyo import POYO
from pretrain.tokens.tokenizer import TokenizerConfig
from pretrain.tracking.export import export_model, load_exported

TINY = ModelConfig(dim=32, depth=1, dim_head=16, cross_heads=1, self_heads=2, latents_per_step=4)


def test_export_reloads_in_both_formats(tmp_path):
    s = simple_session("s1", duration=60.0, n_units=12)
    make_splits(s)
    with CorpusStore(tmp_path / "c") as st:
        st.add(s)
    r = open_corpus(tmp_path / "c").session("s1")
    torch.manual_seed(0)
    model = POYO(TINY, r.unit_ids, ["s1"])
    cfg = TokenizerConfig.build(TINY, window_s=2.0, behaviours={"velocity": ["hand_vel"]},
                                target_scale={"hand_vel": 3.0})
    out = export_model(model, cfg, tmp_path / "v2", {"step": 7})
    doc = json.loads((out / "config.json").read_text())
    assert doc["format_version"] == 2 and doc["provenance"] == {"step": 7}
    # the same export as format 1 wrote it
    v1 = tmp_path / "v1"
    v1.mkdir()
    for f in ("model.safetensors", "vocab.json"):
        (v1 / f).write_bytes((out / f).read_bytes())
    g = cfg.geometry
    (v1 / "config.json").write_text(json.dumps({
        "format": "popscale-model", "format_version": 1, "provenance": {},
        "model": {**TINY.to_dict(), "window": 2.0},
        "tokenizer": {"window": g.window_s, "latent_step": g.latent_step, "latents_per_step": g.latents_per_step,
                      "readouts": {"velocity": ["hand_vel"]}, "target_scale": {"hand_vel": 3.0},
                      "interval_weights": cfg.interval_weights}}))
    model.eval()
    for path in (out, v1):
        m, tok = load_exported(path)
        assert tok.cfg == cfg and m.unit_emb.ids == model.unit_emb.ids
        b = tok.pack([(r.read_window(t, t + 2.0), r, None) for t in (3.0, 20.0)])
        assert b.latent_lens == [4 * 16] * 2  # 2 s windows: 16 steps of 4 latents
        first = r.read_window(3.0, 5.0).behaviour["hand_vel"].values
        assert np.allclose(b.target[: b.output_lens[0]], first / 3.0)  # the export's target scale
        with torch.no_grad():
            assert torch.equal(m(b.to("cpu"))["velocity"], model(b.to("cpu"))["velocity"])
