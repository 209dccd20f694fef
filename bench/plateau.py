"""How fast POYO leaves its initial plateau: the reference recipe vs the two aids (a time-locality
prior on attention, a ridge warm start of unit embeddings), alone and together, side by side.

Each arm trains poyo-1.3M (no dropout, rotary t_min 20 ms, AdamW 2e-3 with 40 warm-up steps,
batch 16 random 1 s train windows, the same window sequence and seed in every arm) in this
process and reports validation R² (hand velocity, 200 random valid windows pooled over the
sessions) every `--eval-every` steps. The corpus is the demo's (16 synthetic sessions, 4
subjects, 5 min), made under runs/bench/ on first use.

Also prints how linearly decodable the corpus is, next to a real M1 recording: a lagged ridge
(Wiener filter: sqrt counts in 50 ms bins, 6 lags; fitted on the first 70 %, its penalty chosen on
the next 10 %, test R² on the last 20 %) per session, and the same on
`../shared/data/real/m1_stevenson_2011.mat` when present. That figure is a test R² of a different
split and protocol from the arms' valid R²: it says how hard the corpus is, it is not an arm.

The result line compares unexplained variance (1 - valid R²), which stays meaningful when the
reference arm's R² is near or below zero (a ratio of R²s does not).

    python bench/plateau.py [--quick] [--steps N] [--arms reference,locality,warm,both]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_service.reader import Corpus, open_corpus  # noqa: E402
from data_service.synth import SynthConfig, synth_corpus  # noqa: E402
from pretrain.model.config import preset  # noqa: E402
from pretrain.model.loss import weighted_mse  # noqa: E402
from pretrain.model.poyo import POYO  # noqa: E402
from pretrain.tokens.tokenizer import Tokenizer, TokenizerConfig  # noqa: E402
from pretrain.run.warm_start import WarmStartConfig, apply_warm_start, unit_directions  # noqa: E402

ARMS = {"reference": (0.0, False), "locality": (6.0, False), "warm": (0.0, True), "both": (6.0, True)}
M1 = ROOT.parent / "shared" / "data" / "real" / "m1_stevenson_2011.mat"


# ---- the bare in-process loop the figures in bench/RESULTS.md were measured with -------------------------
def windows(c: Corpus, split: str, n: int, rng: np.random.Generator) -> list[tuple[str, float]]:
    """n random (session, start) with the whole 1 s window inside the session's `split` domain."""
    out = []
    while len(out) < n:
        sid = c.session_ids[rng.integers(len(c.session_ids))]
        rows = c.session(sid).intervals[split]
        rows = rows[rows[:, 1] - rows[:, 0] >= 1.0]
        if len(rows):
            a, b = rows[rng.integers(len(rows))]
            out.append((sid, float(rng.uniform(a, b - 1.0))))
    return out


def batch(c: Corpus, tok: Tokenizer, wins: list[tuple[str, float]]):
    return tok.pack([(c.session(sid).read_window(t0, t0 + 1.0), c.session(sid), None) for sid, t0 in wins]).to("cpu")


@torch.no_grad()
def r2(model, tok: Tokenizer, c: Corpus, n: int = 200, seed: int = 1) -> float:
    """R2 of velocity over n random valid-split windows (pooled over sessions, both dims averaged)."""
    model.eval()
    wins = windows(c, "valid", n, np.random.default_rng(seed))
    preds, ys = [], []
    for i in range(0, n, 32):
        b = batch(c, tok, wins[i:i + 32])
        out = model(b)[model.readout_names[0]]
        preds.append(out)
        ys.append(b.target[:, : out.shape[1]])
    p, y = torch.cat(preds), torch.cat(ys)
    return float((1 - ((y - p) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)).mean())


def lagged_ridge_r2(counts: np.ndarray, y: np.ndarray, lags: int = 6) -> float:
    """Test R2 of a lagged ridge: fitted on the first 70 % of bins, its penalty chosen on the next
    10 % (valid), scored once on the last 20 % (test)."""
    from pretrain.decoding.metrics import r2_score

    x = np.sqrt(counts)
    z = np.zeros((len(x), x.shape[1] * lags))
    for k in range(lags):
        z[k:, k * x.shape[1]:(k + 1) * x.shape[1]] = x[:len(x) - k]
    a, b = int(0.7 * len(z)), int(0.8 * len(z))
    z = (z - z[:a].mean(0)) / (z[:a].std(0) + 1e-6)
    ym = y[:a].mean(0)
    fits = [np.linalg.solve(z[:a].T @ z[:a] + lam * np.eye(z.shape[1]), z[:a].T @ (y[:a] - ym))
            for lam in (1, 10, 100, 1e3, 1e4)]
    w = max(fits, key=lambda w: r2_score(y[a:b], z[a:b] @ w + ym))
    return r2_score(y[b:], z[b:] @ w + ym)


def decodability(corpus, n: int) -> list[float]:
    out = []
    for sid in corpus.session_ids[:n]:
        r = corpus.session(sid)
        t, u = r.spikes()
        lo, hi = float(r.domain[0, 0]), float(r.domain[-1, 1])
        nb = int((hi - lo) / 0.05)
        x = np.zeros((nb, len(r.unit_ids)))
        np.add.at(x, (np.minimum(((t - lo) / 0.05).astype(int), nb - 1), u), 1)
        bt, bv = r.behaviour("hand_vel")
        c = lo + (np.arange(nb) + 0.5) * 0.05
        out.append(lagged_ridge_r2(x, np.stack([np.interp(c, bt, bv[:, d]) for d in range(2)], 1)))
    return out


def run_arm(corpus, name: str, steps: int, eval_every: int, seed: int = 0) -> list[tuple[int, float, float]]:
    locality, warm = ARMS[name]
    ids = corpus.session_ids
    units = [u for s in ids for u in corpus.session(s).unit_ids]
    torch.manual_seed(seed)
    cfg = preset("poyo-1.3M", t_min=0.02, locality=locality, ffn_dropout=0.0, lin_dropout=0.0, atn_dropout=0.0)
    m = POYO(cfg, units, ids)
    tokens = TokenizerConfig.build(cfg, behaviours={"velocity": ["hand_vel"]}, target_scale={"hand_vel": 20.0})
    if warm:
        apply_warm_start(m, unit_directions(corpus, ids, tokens, WarmStartConfig("ridge")))
    tok = Tokenizer(tokens, m.unit_emb, m.session_emb)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 40))
    rng = np.random.default_rng(seed)
    out, t0 = [], time.perf_counter()
    m.train()
    for step in range(1, steps + 1):
        b = batch(corpus, tok, windows(corpus, "train", 16, rng))
        loss, _ = weighted_mse(m(b), b, m.readout_names)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            out.append((step, r2(m, tok, corpus, n=200), time.perf_counter() - t0))
            m.train()
            print(f"  {name:9s} step {step:4d}  valid R2 {out[-1][1]:+.3f}  ({out[-1][2]:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reference vs both, 100 steps (about two minutes: at 60 steps neither arm has moved yet)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--arms", default=None, help="comma-separated: " + ",".join(ARMS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (100 if args.quick else 400)
    eval_every = args.eval_every or (steps if args.quick else 100)
    arms = (args.arms or ("reference,both" if args.quick else ",".join(ARMS))).split(",")

    root = ROOT / "runs" / "bench" / "plateau-corpus"
    if not (root / "manifest.json").exists():
        synth_corpus(SynthConfig(sessions=16, subjects=4, minutes=5, seed=0), root)
    corpus = open_corpus(root)
    synth = decodability(corpus, 2 if args.quick else 8)
    line = f"lagged ridge test R2 per session (penalty chosen on valid; linear decodability): synthetic {np.round(synth, 2).tolist()}"
    if M1.exists():
        import scipy.io

        d = scipy.io.loadmat(M1)
        line += f"; real M1 (Stevenson 2011, 171 units) test {lagged_ridge_r2(d['spikes'].T.astype(float), d['handVel'][:2].T):.2f}"
    print(line, flush=True)

    results = {a: run_arm(corpus, a, steps, eval_every) for a in arms}
    print(f"\n{'arm':10s} " + " ".join(f"{'@' + str(s):>7s}" for s, _, _ in results[arms[0]]))
    for a, rows in results.items():
        print(f"{a:10s} " + " ".join(f"{v:+7.3f}" for _, v, _ in rows))
    base, best = results[arms[0]][-1][1], results[arms[-1]][-1][1]
    ratio = (1.0 - best) / (1.0 - base)
    print(f"valid R2 after {steps} steps: {arms[-1]} {best:.3f} vs {arms[0]} {base:.3f} "
          f"(ratio of unexplained variance 1 - R2: {arms[-1]} / {arms[0]}; below 1 is better)")
    print(f"RESULT name=valid_unexplained_variance_after_{steps}_steps baseline={arms[0]} ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
