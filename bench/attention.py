"""Which form of variable-length attention is fastest on this CPU, forward + backward.

Shapes of the encoder's cross-attention (latents attending to a window's spike tokens, the only
variable-length attention in the model), for poyo-11.8M (batch 16, 256 latents) and poyo-1.3M
(batch 32, 128 latents), 4 heads of 64. Every form is checked against the per-sample definition
before it is timed; forms take turns and the median of several rounds is reported.

Without dropout (fine-tuning, evaluation): per-sample loop of SDPA, one padded batch with a key
mask, one block-diagonal boolean mask over all tokens, nested (jagged) tensors.
With attention dropout 0.2 (pretraining, as the reference): SDPA (math path: the CPU flash kernel
has no dropout) padded, vs popscale's blocked kernel (pretrain/model/ops.py).

    python bench/attention.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pretrain.model.attention import SDPA, naive  # noqa: E402
from pretrain.model.ops import packed_dropout_attention  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def block_diagonal(q, k, v, q_lens, k_lens):
    qc = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    kc = torch.repeat_interleave(torch.arange(len(k_lens)), torch.tensor(k_lens))
    mask = qc[:, None] == kc[None, :]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask)
    return o[0].transpose(0, 1)


def nested(q, k, v, q_lens, k_lens):
    def nj(x, lens):
        offs = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
        return torch.nested.nested_tensor_from_jagged(x, offsets=offs).transpose(1, 2)

    o = F.scaled_dot_product_attention(nj(q, q_lens), nj(k, k_lens), nj(v, k_lens))
    return o.transpose(1, 2).values()


def interleaved(forms: dict, rounds: int) -> dict[str, float]:
    """Median fwd+bwd ms of each form, the forms taking turns (so drifts in machine load hit all)."""
    times: dict[str, list[float]] = {name: [] for name in forms}
    for r in range(rounds + 1):
        for name, f in forms.items():
            t = time.perf_counter()
            f().sum().backward()
            if r:  # the first round warms up
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def compare(b: int, lq: int, k_range: tuple[int, int], rounds: int, h: int = 4, d: int = 64) -> tuple[str, float]:
    k_lens = torch.randint(*k_range, (b,)).tolist()
    q_lens = [lq] * b
    q = torch.randn(sum(q_lens), h, d, requires_grad=True)
    k = torch.randn(sum(k_lens), h, d, requires_grad=True)
    v = torch.randn(sum(k_lens), h, d, requires_grad=True)
    ref = naive(q, k, v, q_lens, k_lens).detach()
    print(f"\n{b} samples x {lq} queries, keys {min(k_lens)}-{max(k_lens)} per sample, {h} heads x {d}; "
          f"padding wastes {1 - sum(k_lens) / (b * max(k_lens)):.0%} of key slots; median of {rounds} rounds")
    forms = {
        "sdpa per-sample loop": lambda: SDPA("loop")(q, k, v, q_lens, k_lens),
        "sdpa padded + key mask": lambda: SDPA("padded")(q, k, v, q_lens, k_lens),
        "sdpa block-diagonal bool mask": lambda: block_diagonal(q, k, v, q_lens, k_lens),
        "sdpa nested jagged tensors": lambda: nested(q, k, v, q_lens, k_lens),
    }
    usable = {}
    for name, f in forms.items():
        try:
            diff = float((f().detach() - ref).abs().max())
        except Exception as e:  # noqa: BLE001 - a form this torch build cannot run is a finding too
            print(f"  {name:42s} fails: {type(e).__name__}: {str(e)[:60]}")
            continue
        usable[name] = f
        forms[name] = diff
    print(f"  {'no dropout':40s} {'fwd+bwd ms':>10s} {'max |diff| vs definition':>26s}")
    times = interleaved(usable, rounds)
    for name, ms in times.items():
        print(f"  {name:40s} {ms:10.1f} {forms[name]:26.2e}")
    best = min(times, key=times.get)
    drop = interleaved({
        "sdpa (math path) padded + key mask": lambda: SDPA("padded")._padded(q, k, v, q_lens, k_lens, dropout_p=0.2,
                                                                           training=True),
        "popscale blocked dropout attention": lambda: packed_dropout_attention(q, k, v, q_lens, k_lens, 0.2),
    }, rounds)
    print(f"  {'attention dropout 0.2 (training)':40s}")
    for name, ms in drop.items():
        print(f"  {name:40s} {ms:10.1f}")
    print(f"  fastest without dropout: {best}")
    return best, drop["sdpa (math path) padded + key mask"] / drop["popscale blocked dropout attention"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rounds = 2 if a.quick else 5
    shapes = [(8, 128, (500, 2000))] if a.quick else [(16, 256, (1000, 3000)), (32, 128, (300, 2000))]
    ratios = [compare(b, lq, kr, rounds)[1] for b, lq, kr in shapes]  # poyo-11.8M-like, poyo-1.3M-like
    print(f"RESULT name=dropout_attention_fwd_bwd_ms baseline=sdpa-math-padded ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
