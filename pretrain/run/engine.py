"""The DeepSpeed engine a worker trains: model and optimizer from the plan, ZeRO 1/2, gradient
accumulation and clipping, warmup + cosine LR; fp32 + gloo on CPU, bf16 + NCCL on GPU (bf16-mixed,
fp32 state with a bf16 forward under torch.autocast, for elastic runs)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .build import build_model
from .config import precision
from .optim import build_optimizer, warmup_cosine
from .plan import RunPlan


@dataclass
class Placement:
    """Where a worker computes: its rank among `world`, its device and precision (config.PRECISIONS)."""

    rank: int
    world: int
    device: torch.device
    precision: str = "fp32"

    @property
    def bf16(self) -> bool:
        """DeepSpeed's bf16 optimizer: bf16 weights, and a master copy partitioned by the number of workers."""
        return self.precision == "bf16"

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype the forward runs in under torch.autocast over fp32 weights (bf16-mixed), else None."""
        return torch.bfloat16 if self.precision == "bf16-mixed" else None


def placement(plan: RunPlan, rank: int, world: int, local_rank: int = 0) -> Placement:
    use_gpu = plan.run.cluster.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    return Placement(rank, world, device, precision(plan.run, use_gpu))


def deepspeed_config(plan: RunPlan, world: int, bf16: bool) -> dict:
    """DeepSpeed's batch sizes are bookkeeping here (the loop feeds it batches and normalises the loss
    itself): a world that does not divide the global batch (an elastic run's survivors) declares the
    largest share, so DeepSpeed's product rule holds."""
    t, d = plan.run.train, plan.run.data
    micro = max(1, -(-d.global_batch // world))
    return {
        "train_batch_size": micro * world * t.grad_accum,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def skip_cpu_shm_kernel() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce kernel on first use on CPU (~33 s here)
    and documents that it hangs on CPUs without AVX2/AVX-512; gloo's all-reduce is plenty for one
    node of CPU workers, so popscale uses that."""
    # `import deepspeed.comm.torch as m` binds PyTorch itself (deepspeed.comm has an attribute
    # `torch`), so patching that did nothing and every engine compiled the kernel (35-85 s a run)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def build_engine(plan: RunPlan, where: Placement):
    """(engine, lr scheduler) over the plan's model, seeded so every worker starts identical."""
    # deferred: importing deepspeed only when used keeps start-up light
    import deepspeed

    t = plan.run.train
    if where.device.type == "cpu":
        torch.set_num_threads(max(1, int(plan.run.cluster.cpus_per_worker)))
        skip_cpu_shm_kernel()
    torch.manual_seed(t.seed)
    model = build_model(plan, where.device)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, t.optim), config=deepspeed_config(plan, where.world, where.bf16),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, t.steps, t.warmup_steps, t.final_lr_ratio)))
    return engine, scheduler
