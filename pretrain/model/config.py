"""Model configuration, with sizes named after the reference so comparisons are like for like.

`poyo-1.3M` and `poyo-11.8M` are torch_brain's `poyo_1.3M` / `poyo_11.8M` configs (dims, depth,
heads, latents, dropouts, rotary periods; ../shared/notes/poyo-reference.md) and count 1.25 M and
11.72 M parameters without vocabularies, as the reference does. The others extend the family
for scaling sweeps (width and depth grown together, dim_head fixed at 64) and are named by
their counts (tests/test_model.py checks every name).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class ModelConfig:
    dim: int = 64
    depth: int = 6
    dim_head: int = 64
    cross_heads: int = 2
    self_heads: int = 8
    latents_per_step: int = 16
    latent_step: float = 0.125  # seconds between groups of latents (the window is the data's: data.window_s)
    ffn_dropout: float = 0.2
    lin_dropout: float = 0.4
    atn_dropout: float = 0.2
    emb_init_scale: float = 0.02
    t_min: float = 1e-4  # shortest rotary period, seconds
    t_max: float = 2.0627  # longest rotary period, seconds
    ffn_mult: int = 4
    # readout name -> output dimension (e.g. {"velocity": 2}); behaviours map onto readouts in the data config
    readouts: dict[str, int] = field(default_factory=lambda: {"velocity": 2})
    backend: str = "auto"  # auto | sdpa | xformers | naive
    # recompute each processor layer in backward instead of keeping its activations: ~1/3 more
    # compute, a fraction of the memory (for large models / batches)
    checkpoint_layers: bool = False
    # a time-locality prior at initialisation: queries and keys get a learned bias, aligned in every
    # rotary pair with period >= locality_min_period, so that attention starts out peaked at equal
    # times (a peak logit of `locality`) instead of flat; 0 = off (the reference)
    locality: float = 0.0
    locality_min_period: float = 0.05
    # time-causal attention (a live decoder, issue 29): every latent sees only the spikes up to the end of
    # its latent step, and the latents of steps ending no later; every output query only the latents of
    # steps ended at or before its time. Then each query's prediction uses no later spike, whatever its
    # place in the window, so every sample of a window is a causal target in training
    causal: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    "poyo-1.3M": ModelConfig(dim=64, depth=6, cross_heads=2, self_heads=8, latents_per_step=16),
    "poyo-11.8M": ModelConfig(dim=128, depth=24, cross_heads=4, self_heads=8, latents_per_step=32),
    # a ladder for scaling sweeps, named by their parameter count without vocabularies
    "poyo-2.8M": ModelConfig(dim=96, depth=8, cross_heads=2, self_heads=8, latents_per_step=16),
    "poyo-6.2M": ModelConfig(dim=128, depth=12, cross_heads=4, self_heads=8, latents_per_step=32),
    "poyo-23M": ModelConfig(dim=256, depth=16, cross_heads=4, self_heads=8, latents_per_step=32),
    "poyo-76M": ModelConfig(dim=384, depth=24, cross_heads=6, self_heads=12, latents_per_step=64),
    "poyo-263M": ModelConfig(dim=768, depth=24, cross_heads=8, self_heads=16, latents_per_step=64),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
