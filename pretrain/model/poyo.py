"""POYO: a PerceiverIO over spike tokens (Azabou et al., NeurIPS 2023), on packed batches.

    spikes ──(unit emb + token-type emb, rotary time)──┐
    latents (learned, every latent_step) ──cross-attn──► latents ──depth x self-attn──► latents
    output queries (session emb at each behaviour time) ──cross-attn──► readout per behaviour

Pre-LayerNorm residual blocks with GEGLU feed-forwards. Rotary time embeddings rotate queries
and keys everywhere; in the encoder and the processor the values are rotated too and the
output counter-rotated by the query's time, so what is aggregated is relative in time. A causal
model (ModelConfig.causal) masks every attention by time: no output sees a later spike. Every
tensor is packed (all samples' tokens concatenated, `*_lens` per sample): the model takes a
PackedBatch and never sees Zarr, Ray or MLflow.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Backend, Lens, Times, get_backend
from .batch import PackedBatch
from .config import ModelConfig
from .numerics import flushed
from .ops import Dropout, geglu_dropout
from .rotary import RotaryTime, Rotation, rotate
from .vocab import VocabEmbedding


class FeedForward(nn.Module):
    """LayerNorm -> Linear(d, 2 m d) -> GEGLU -> Dropout -> Linear(m d, d)."""

    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.w_in = nn.Linear(dim, 2 * mult * dim)
        self.dropout = dropout
        self.w_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(geglu_dropout(self.w_in(self.norm(x)), self.dropout, self.training))


class Attention(nn.Module):
    """Multi-head attention over packed tokens: self-attention, or cross-attention to a context."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, *, cross: bool, rotate_value: bool,
                 backend: Backend, prior: torch.Tensor | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.cross, self.rotate_value, self.backend = cross, rotate_value, backend
        self.norm = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim) if cross else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        # locality prior: q/k biases whose rotated product is a kernel peaked at zero time difference
        self.q_bias = nn.Parameter(prior.repeat(heads, 1)) if prior is not None else None
        self.k_bias = nn.Parameter(prior.repeat(heads, 1)) if prior is not None else None

    def forward(self, x: torch.Tensor, rot: Rotation, lens: Lens, ctx: torch.Tensor | None = None,
                rot_ctx: Rotation | None = None, ctx_lens: Lens | None = None, times: Times | None = None) -> torch.Tensor:
        h, d = self.heads, self.dim_head
        xn = self.norm(x)
        if self.cross:
            ctx, rot_ctx, ctx_lens = self.norm_ctx(ctx), rot_ctx, ctx_lens
        else:
            ctx, rot_ctx, ctx_lens = xn, rot, lens
        q = self.to_q(xn).view(-1, h, d)
        k, v = self.to_kv(ctx).view(-1, 2, h, d).unbind(1)
        if self.q_bias is not None:
            q, k = q + self.q_bias, k + self.k_bias
        q = rotate(q, rot)
        k = rotate(k, rot_ctx)
        if self.rotate_value:
            v = rotate(v, rot_ctx)
        o = self.backend(q, k, v, lens, ctx_lens, dropout_p=self.dropout, training=self.training, times=times)
        if self.rotate_value:
            o = rotate(o, rot.inverse())
        return self.to_out(o.reshape(-1, h * d))


class POYO(nn.Module):
    def __init__(self, cfg: ModelConfig, unit_ids=(), session_ids=(), device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        backend = get_backend(cfg.backend, device)
        self.backend_name = backend.name
        self.unit_emb = VocabEmbedding(d, "unit", cfg.emb_init_scale, unit_ids)
        self.session_emb = VocabEmbedding(d, "session", cfg.emb_init_scale, session_ids)
        self.token_type_emb = nn.Embedding(3, d)
        self.latent_emb = nn.Embedding(cfg.latents_per_step, d)
        self.readout_names = list(cfg.readouts)
        self.readout_emb = nn.Embedding(len(cfg.readouts), d) if len(cfg.readouts) > 1 else None
        self.rotary = RotaryTime(cfg.dim_head, cfg.t_min, cfg.t_max)

        prior = locality_prior(self.rotary.omega, cfg) if cfg.locality > 0 else None

        def attn(heads: int, *, cross: bool, rotate_value: bool) -> Attention:
            return Attention(d, heads, cfg.dim_head, cfg.atn_dropout, cross=cross, rotate_value=rotate_value,
                             backend=backend, prior=prior)

        self.enc_atn = attn(cfg.cross_heads, cross=True, rotate_value=True)
        self.enc_ffn = FeedForward(d, cfg.ffn_mult, cfg.ffn_dropout)
        self.proc = nn.ModuleList(
            nn.ModuleList([attn(cfg.self_heads, cross=False, rotate_value=True),
                           FeedForward(d, cfg.ffn_mult, cfg.ffn_dropout)]) for _ in range(cfg.depth))
        self.lin_drop = Dropout(cfg.lin_dropout)
        self.dec_atn = attn(cfg.cross_heads, cross=True, rotate_value=False)
        self.dec_ffn = FeedForward(d, cfg.ffn_mult, cfg.ffn_dropout)
        self.readouts = nn.ModuleDict({name: nn.Linear(d, dim_out) for name, dim_out in cfg.readouts.items()})
        for emb in (self.token_type_emb, self.latent_emb) + ((self.readout_emb,) if self.readout_emb else ()):
            nn.init.normal_(emb.weight, std=cfg.emb_init_scale)
        self.to(device)

    def forward(self, b: PackedBatch) -> dict[str, torch.Tensor]:
        """Predictions per readout, rows in the order of that readout's output tokens. On the CPU with
        denormals flushed (numerics.py: a trained model's attention is otherwise much slower)."""
        with flushed(b.unit_index.device.type == "cpu"):
            return self._forward(b)

    def _forward(self, b: PackedBatch) -> dict[str, torch.Tensor]:
        x = self.unit_emb(b.unit_index) + self.token_type_emb(b.token_type)
        lat = self.latent_emb(b.latent_index)
        rot_in, rot_lat = self.rotary(b.input_time), self.rotary(b.latent_time)

        # a causal model: a latent stands for its step up to the step's end (latents sit at step centres)
        seen = b.latent_time + self.cfg.latent_step / 2 if self.cfg.causal else None
        lat = lat + self.enc_atn(lat, rot_lat, b.latent_lens, x, rot_in, b.input_lens,
                                 times=None if seen is None else (seen, b.input_time))
        lat = lat + self.enc_ffn(lat)
        own = None if seen is None else (seen, seen)
        for atn, ffn in self.proc:
            if self.cfg.checkpoint_layers and self.training and torch.is_grad_enabled():
                lat = checkpoint(self._layer, atn, ffn, lat, rot_lat, b.latent_lens, own, use_reentrant=False)
            else:
                lat = self._layer(atn, ffn, lat, rot_lat, b.latent_lens, own)

        if b.output_time.numel() == 0:
            return {name: ro(lat[:0]) for name, ro in self.readouts.items()}  # empty, but in the graph
        q = self.session_emb(b.output_session)
        if self.readout_emb is not None:
            q = q + self.readout_emb(b.output_readout)
        q = q + self.dec_atn(q, self.rotary(b.output_time), b.output_lens, lat, rot_lat, b.latent_lens,
                             times=None if seen is None else (b.output_time, seen))
        q = q + self.dec_ffn(q)
        if len(self.readouts) == 1:
            name = self.readout_names[0]
            return {name: self.readouts[name](q)}
        return {name: self.readouts[name](q[b.output_readout == i]) for i, name in enumerate(self.readout_names)}

    def _layer(self, atn: "Attention", ffn: FeedForward, lat: torch.Tensor, rot: Rotation, lens: Lens,
               times: Times | None = None) -> torch.Tensor:
        lat = lat + self.lin_drop(atn(lat, rot, lens, times=times))
        return lat + self.lin_drop(ffn(lat))

    # ---- vocabularies ---------------------------------------------------------------------------
    def embedding_parameters(self) -> list[nn.Parameter]:
        """The unit and session embeddings: updated only where a batch touches them (see optim.py)."""
        return [self.unit_emb.weight, self.session_emb.weight]

    def add_readout(self, name: str, dims: int) -> None:
        """A new output head (adapting to a behaviour the model was not pretrained on). Readouts are
        told apart by a readout embedding added to the queries; when the model had one readout it
        gains that embedding with a zero row for the old readout, so the old one predicts exactly
        what it did. Rebuild the optimizer after."""
        if name in self.readouts:
            raise ValueError(f"the model already has a readout {name!r}")
        d, device = self.cfg.dim, self.latent_emb.weight.device
        self.readouts[name] = nn.Linear(d, dims).to(device)
        self.readout_names.append(name)
        self.cfg = replace(self.cfg, readouts={**self.cfg.readouts, name: dims})
        old = self.readout_emb.weight.detach() if self.readout_emb is not None else torch.zeros(1, d, device=device)
        emb = nn.Embedding(len(self.readout_names), d).to(device)
        with torch.no_grad():
            emb.weight[: len(old)] = old
            emb.weight[len(old):] = (torch.randn(len(self.readout_names) - len(old), d, device=device)
                                     * self.cfg.emb_init_scale)
        self.readout_emb = emb


def locality_prior(omega: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A (dim_head,) vector c with q = k = c giving scores sum_p c_p^2 cos(w_p dt) / sqrt(dim_head):
    equal weight on every rotary pair slower than `locality_min_period`, peak `locality` at dt = 0."""
    periods = 2 * torch.pi / omega.clamp_min(1e-12)
    use = (omega > 0) & (periods >= cfg.locality_min_period)
    c = torch.zeros(cfg.dim_head // 2, 2)
    if use.any():
        c[use, 0] = (cfg.locality * cfg.dim_head**0.5 / use.sum()) ** 0.5
    return c.reshape(-1)


def count_parameters(model: nn.Module, *, embeddings: bool = False) -> int:
    """Parameters, by default without the unit/session vocabularies (which grow with the data)."""
    skip = {id(p) for p in model.embedding_parameters()} if not embeddings else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
