"""The training strategy from the `strategy` config group: Lightning's own ("auto", "ddp", ...) or
`ZeroStrategy`, DeepSpeed ZeRO through Lightning's DeepSpeedStrategy that also runs on CPU.

Lightning's DeepSpeedStrategy refuses every accelerator but CUDA, although DeepSpeed runs ZeRO
stages 1-3 on CPU with the gloo backend (DeepSpeed picks its CPU accelerator when no GPU is
visible). Allowing it is what lets the ZeRO code paths (partitioned optimizer states, gradients
and, for stage 3, parameters; their checkpoints) run in CI on a machine without a GPU.
"""

import warnings
from dataclasses import dataclass

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from train.config import ConfigError, _require


class ZeroStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy that also accepts the CPU accelerator (process group: gloo)."""

    strategy_name = "zero"

    def __init__(self, *args, param_persistence_threshold: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if param_persistence_threshold is not None and self.config.get("zero_optimization", {}).get("stage") == 3:
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = param_persistence_threshold
        # Gradient clipping goes through DeepSpeed's config (trainer.gradient_clip_val); the
        # modules' own clipping hook then finds no .grad and does nothing, as intended.
        warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_environment()
        else:  # skip DeepSpeedStrategy's CUDA-only check; DDPStrategy's setup is what it runs next
            DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_distributed()
        # CPU devices have no index, which the CUDA device-index check would reject.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        """deepspeed.initialize, as Lightning calls it, with a device rank on CPU too: DeepSpeed
        reads a missing one (CPU devices have no index) as "not distributed" and would train every
        rank as a world of one."""
        import argparse

        import deepspeed

        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer


@dataclass
class StrategyConfig:
    """conf/strategy/*.yaml. name: a Lightning strategy name, or "zero" for ZeroStrategy."""

    name: str = "auto"
    stage: int = 2  # ZeRO stage (zero only): 1 optimizer states, 2 + gradients, 3 + parameters
    offload_optimizer: bool = False  # optimizer states and step on the CPU (zero only)
    offload_parameters: bool = False  # stage 3 parameters on the CPU (zero only)
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    timeout_minutes: int = 30  # collective timeout: how long a rank waits for a dead peer
    # ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold): norms, biases, modulation offsets.
    param_persistence_threshold: int = 100_000

    def __post_init__(self):
        _require(self.stage in (1, 2, 3), "strategy.stage", self.stage, "choose 1, 2 or 3")
        _require(not self.offload_parameters or self.stage == 3, "strategy.offload_parameters", self.offload_parameters, "needs strategy.stage=3")
        _require(self.timeout_minutes > 0, "strategy.timeout_minutes", self.timeout_minutes, "must be > 0")


def build_strategy(cfg: StrategyConfig, micro_batch_size: int, world_size: int):
    """A Lightning strategy object or name for the Trainer. micro_batch_size: the loader's batch
    size per rank (DeepSpeed's train_micro_batch_size_per_gpu; our loader has no batch sampler
    for Lightning to read it from)."""
    if cfg.name == "auto" and world_size > 1:
        # Lightning's auto choice for several processes is plain DDP, which rejects the weights a
        # batch leaves unused (image embedding/head outside image-to-video): conf/strategy/ddp.yaml.
        return "ddp_find_unused_parameters_true"
    if cfg.name != "zero":
        return cfg.name
    from datetime import timedelta

    try:
        return ZeroStrategy(
            stage=cfg.stage,
            offload_optimizer=cfg.offload_optimizer,
            offload_parameters=cfg.offload_parameters,
            allgather_bucket_size=cfg.allgather_bucket_size,
            reduce_bucket_size=cfg.reduce_bucket_size,
            overlap_comm=cfg.overlap_comm,
            timeout=timedelta(minutes=cfg.timeout_minutes),
            logging_batch_size_per_gpu=micro_batch_size,
            param_persistence_threshold=cfg.param_persistence_threshold,
            logging_level=40,  # logging.ERROR: DeepSpeed's info lines drown the run's own
        )
    except ImportError as e:
        raise ConfigError(f"strategy.name=zero: {e}") from None


def is_partitioned(module: torch.nn.Module) -> bool:
    """True when ZeRO-3 holds the module's parameters in partitions (`p.ds_tensor`): a forward,
    and gathering weights, are then collectives every rank must join."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def full_weights(module: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """Whole weights by name, on CPU, from any strategy. Under ZeRO-3 every rank must call this
    (each parameter is all-gathered in turn, so no rank ever holds more than one extra); only
    ranks with keep=True collect them, the others get {}."""
    if not is_partitioned(module):
        return {n: p.detach().cpu().clone() for n, p in module.named_parameters()} if keep else {}
    import deepspeed

    weights = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if keep:
                weights[name] = p.detach().cpu().clone()
    return weights
