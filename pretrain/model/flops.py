"""Parameters and FLOPs of a configuration, analytically (for scaling sweeps).

6ND does not hold for a PerceiverIO: the encoder's cost scales with spike tokens x latents and
the processor's with latents^2, independently of the parameter count. FLOPs here count a
multiply-add as 2; a training step is ~3x the forward (backward = 2x forward). LayerNorms,
softmax, rotary and dropout are left out (a few % at these sizes).
"""

from __future__ import annotations

from .config import ModelConfig


def parameters(cfg: ModelConfig, n_units: int = 0, n_sessions: int = 0) -> int:
    """Trainable parameters; the vocabularies only if n_units / n_sessions are given."""
    d, dh, m = cfg.dim, cfg.dim_head, cfg.ffn_mult
    ffn = 2 * d + d * 2 * m * d + 2 * m * d + m * d * d + d  # norm, w_in (+b), w_out (+b)

    def attn(heads: int, cross: bool) -> int:
        inner = heads * dh
        norms = (4 if cross else 2) * d
        return norms + d * inner + d * 2 * inner + inner * d + d

    readout_emb = len(cfg.readouts) * d if len(cfg.readouts) > 1 else 0
    return (3 * d + cfg.latents_per_step * d + readout_emb
            + attn(cfg.cross_heads, True) + ffn
            + cfg.depth * (attn(cfg.self_heads, False) + ffn)
            + attn(cfg.cross_heads, True) + ffn
            + sum(d * k + k for k in cfg.readouts.values())
            + (n_units + n_sessions) * d)


def forward_flops(cfg: ModelConfig, n_inputs: float, n_outputs: float, n_latents: int) -> float:
    """FLOPs of one sample's forward pass: n_inputs spike+start/end tokens, n_outputs queries,
    n_latents latents (the window's latent grid: `Geometry.n_latents`)."""
    d, dh, m, lat = cfg.dim, cfg.dim_head, cfg.ffn_mult, n_latents
    ffn = 2 * 3 * m * d * d  # per token
    hc, hs = cfg.cross_heads * dh, cfg.self_heads * dh
    enc = 2 * lat * d * hc + 2 * n_inputs * d * 2 * hc + 4 * lat * n_inputs * hc + 2 * lat * hc * d + lat * ffn
    layer = 2 * lat * d * 3 * hs + 4 * lat * lat * hs + 2 * lat * hs * d + lat * ffn
    dec = (2 * n_outputs * d * hc + 2 * lat * d * 2 * hc + 4 * n_outputs * lat * hc + 2 * n_outputs * hc * d
           + n_outputs * ffn + 2 * n_outputs * d * max(cfg.readouts.values()))
    return float(enc + cfg.depth * layer + dec)


def train_flops(cfg: ModelConfig, n_inputs: float, n_outputs: float, n_latents: int) -> float:
    return 3.0 * forward_flops(cfg, n_inputs, n_outputs, n_latents)
