"""The training strategy from the `strategy` config group: Lightning's own ("auto", "ddp", ...) or
`ZeroStrategy`, DeepSpeed ZeRO through Lightning's DeepSpeedStrategy that also runs on CPU, and
for modules that train several networks at their own rates (distill) `PerNetworkZeroStrategy`,
one DeepSpeed engine per network.

Lightning's DeepSpeedStrategy refuses every accelerator but CUDA, although DeepSpeed runs ZeRO
stages 1-3 on CPU with the gloo backend (DeepSpeed picks its CPU accelerator when no GPU is
visible). Allowing it is what lets the ZeRO code paths (partitioned optimizer states, gradients
and, for stage 3, parameters; their checkpoints) run in CI on a machine without a GPU.
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from train.checkpoint import replace_directory_atomically
from train.config import ConfigError, _require


class ZeroStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy that also accepts the CPU accelerator (process group: gloo)."""

    strategy_name = "zero"

    def __init__(self, *args, param_persistence_threshold: int | None = None, compiled_blocks: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.get("zero_optimization", {}).get("stage") == 3:
            if param_persistence_threshold is not None:
                self.config["zero_optimization"]["stage3_param_persistence_threshold"] = param_persistence_threshold
            if compiled_blocks:
                # zero.Init would replace torch.nn.functional.linear for good with an autograd
                # Function that reads each weight's ds_id: inside a compiled block, a guard per
                # weight, so one graph per layer instead of one per kind of block. That Function
                # keeps autograd from holding a gathered weight (through the transposed view a
                # matmul saves) until the backward; a checkpointed block saves no such view, an
                # uncheckpointed one may (docs/performance.md).
                self.config["zero_optimization"]["memory_efficient_linear"] = False
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

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A DeepSpeed checkpoint is a directory that every rank writes its part of, and re-saving
        last.ckpt overwrites its files in place: a run killed mid-save (kill -9, a node lost, the
        scheduler's hard kill after the preemption grace) would leave a torn or half-new newest
        checkpoint, which resume=auto picks and cannot load (or loads mixed). So it is written
        whole or not at all (replace_directory_atomically), as the single-file checkpoints of the
        other strategies are (train/checkpoint.SameDirectoryCheckpointIO)."""
        filepath = Path(self.broadcast(str(filepath)))
        replace_directory_atomically(filepath, lambda path: self._write_checkpoint(checkpoint, path, storage_options),
                                     self.barrier, self.is_global_zero)

    def _write_checkpoint(self, checkpoint: dict, path: Path, storage_options=None) -> None:
        DeepSpeedStrategy.save_checkpoint(self, checkpoint, str(path), storage_options)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        clear_gradient_partitions(self.deepspeed_engine)
        return out

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None, config=None):
        """deepspeed.initialize, as Lightning calls it, with a device rank on CPU too: DeepSpeed
        reads a missing one (CPU devices have no index) as "not distributed" and would train every
        rank as a world of one."""
        import argparse

        import deepspeed

        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=config or self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer


class PerNetworkZeroStrategy(ZeroStrategy):
    """ZeRO for a LightningModule that trains several networks, each with its own optimizer and
    at its own rate (the distill stage: student and critic): one DeepSpeed engine per network, as
    DeepSpeed-Chat runs actor and critic, instead of Lightning's one engine for the whole module
    (which allows one optimizer).

    The module names its networks: `deepspeed_networks()` -> {name: (module, optimizer index in
    configure_optimizers)} for the trained ones, `frozen_networks()` -> {name: module} for the
    others (the teacher). Under ZeRO-3 a frozen network is partitioned too (an engine without
    optimizer), or, with `frozen_partitioned=False`, replicated on every GPU in the compute dtype.
    A network's backward goes through `backward_network(loss, name)`; its step through Lightning's
    optimizer step (found by optimizer) or `step_network(name)`. An engine that has seen no backward
    since its last step is not stepped: as with torch's AdamW, no gradients change nothing
    (DeepSpeed would step on zeros: moments and weight decay would move). Checkpoints are
    directories with one DeepSpeed checkpoint per trained network (tag = its name); the frozen
    ones are rebuilt by the module, not saved."""

    strategy_name = "zero_per_network"

    def __init__(self, *args, frozen_partitioned: bool = True, gradient_clipping: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen_partitioned = frozen_partitioned
        if gradient_clipping is not None:  # the module's own clipping sees no .grad under ZeRO
            self.config["gradient_clipping"] = float(gradient_clipping)
        self.engines: dict = {}
        self._has_grads: dict[str, bool] = {}

    def _initialize_deepspeed_train(self, model) -> None:
        from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

        module = self.lightning_module
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(module)
        if schedulers:
            raise ConfigError("strategy=zero with one engine per network: the module must set its learning rates itself (no lr_scheduler)")
        self.config.setdefault("train_micro_batch_size_per_gpu", 1)
        wrapped = [None] * len(optimizers)
        self._name_of_optimizer = {}
        for name, (network, index) in module.deepspeed_networks().items():
            engine, wrapped[index] = self._setup_model_and_optimizer(network, optimizers[index])
            self.engines[name] = engine
            self._name_of_optimizer[id(wrapped[index])] = name
        self.frozen: dict = {}
        for name, network in module.frozen_networks().items():
            if self.zero_stage_3 and self.frozen_partitioned:
                config = {k: v for k, v in self.config.items() if k in ("train_micro_batch_size_per_gpu", "bf16", "fp16", "zero_optimization")}
                self.frozen[name] = self._setup_model_and_optimizer(network, None, config=config)[0]
            else:
                dtype = torch.bfloat16 if self.config.get("bf16", {}).get("enabled") else None
                self.frozen[name] = network.to(device=self.root_device, dtype=dtype)
        self.optimizers = wrapped
        self.model = model  # the LightningModule itself; its networks run inside their engines' hooks

    # ---- backward and step, per network ----------------------------------------------------------
    def backward_network(self, loss: torch.Tensor, name: str) -> None:
        self.engines[name].backward(loss)
        self._has_grads[name] = True

    def step_network(self, name: str) -> None:
        if self._has_grads.pop(name, False):
            self.engines[name].step()
            clear_gradient_partitions(self.engines[name])

    def grad_norm(self, name: str):
        """The norm DeepSpeed clipped at in the network's last step (before clipping), or None."""
        return self.engines[name].get_global_grad_norm()

    def skipped_steps(self, name: str) -> int:
        """Steps of the network's engine that DeepSpeed skipped on a gradient overflow (inf/NaN), in total."""
        return int(self.engines[name].skipped_steps)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        closure()  # manual optimisation: nothing to compute here
        self.step_network(self._name_of_optimizer[id(optimizer)])

    # ---- checkpoints: one DeepSpeed checkpoint per trained network ----------------------------
    def _write_checkpoint(self, checkpoint: dict, path: Path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options is not supported with DeepSpeed checkpoints")
        client_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        for i, (name, engine) in enumerate(self.engines.items()):
            # Lightning's state (step, loops, callbacks, the module's own) rides with the first.
            engine.save_checkpoint(str(path), tag=name, client_state=client_state if i == 0 else {}, save_latest=False)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        from lightning.pytorch.trainer.states import TrainerFn

        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        client_states = []
        for name, engine in self.engines.items():
            path, state = engine.load_checkpoint(checkpoint_path, tag=name, load_optimizer_states=fitting, load_lr_scheduler_states=False)
            if path is None:
                raise ConfigError(f"{checkpoint_path}: no DeepSpeed checkpoint of network {name!r} in it (tag {name}); "
                                  "was it written by this stage with strategy=zero2/zero3?")
            client_states.append(state)
        return client_states[0]  # Lightning's state: saved with the first engine


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


def build_strategy(cfg: StrategyConfig, micro_batch_size: int, world_size: int, per_network: dict | None = None,
                   compiled_blocks: bool = False):
    """A Lightning strategy object or name for the Trainer. micro_batch_size: the loader's batch
    size per rank (DeepSpeed's train_micro_batch_size_per_gpu; our loader has no batch sampler
    for Lightning to read it from). per_network: for a module that trains several networks, ZeRO
    becomes PerNetworkZeroStrategy with these arguments (frozen_partitioned, gradient_clipping).
    compiled_blocks: the module compiles its blocks (run.compile)."""
    if cfg.name == "auto" and world_size > 1:
        # Lightning's auto choice for several processes is plain DDP, which rejects the weights a
        # batch leaves unused (image embedding/head outside image-to-video): conf/strategy/ddp.yaml.
        return "ddp_find_unused_parameters_true"
    if cfg.name != "zero":
        return cfg.name
    from datetime import timedelta

    cls, extra = (PerNetworkZeroStrategy, per_network) if per_network is not None else (ZeroStrategy, {})
    try:
        return cls(
            stage=cfg.stage,
            offload_optimizer=cfg.offload_optimizer,
            offload_parameters=cfg.offload_parameters,
            allgather_bucket_size=cfg.allgather_bucket_size,
            reduce_bucket_size=cfg.reduce_bucket_size,
            overlap_comm=cfg.overlap_comm,
            timeout=timedelta(minutes=cfg.timeout_minutes),
            logging_batch_size_per_gpu=micro_batch_size,
            param_persistence_threshold=cfg.param_persistence_threshold,
            compiled_blocks=compiled_blocks,
            logging_level=40,  # logging.ERROR: DeepSpeed's info lines drown the run's own
            **extra,
        )
    except ImportError as e:
        raise ConfigError(f"strategy.name=zero: {e}") from None


def clear_gradient_partitions(engine) -> None:
    """After a ZeRO-3 step: zero the optimizer's flat buffer of gradient partitions. DeepSpeed 0.19
    writes a parameter's partition into it only when that parameter's gradient hook fires, and
    builds each step's gradients from the whole buffer, which it never clears: a weight the step
    did not use (the audio head in a video-only step, flow.no_audio_rate; the image embedding in a
    text-to-video one, flow.i2v_rate) would get its last gradient again, step after step. Zeroed,
    it gets zero, as under ZeRO-2 (stage3.py: partition_grads, _optimizer_step)."""
    buffer = getattr(getattr(engine, "optimizer", None), "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()


def check_resume_layout(checkpoint: str | Path, zero_stage: int | None, world_size: int) -> None:
    """Before any process group: a checkpoint resumes only under the layout it was written with.
    DeepSpeed reads a ZeRO checkpoint only under its own stage and, for ZeRO-3, its own number of
    ranks (otherwise a bare AssertionError from inside its loader), and a single-file checkpoint
    is not a ZeRO one. zero_stage: None when the run does not use ZeRO."""
    path = Path(checkpoint)
    optim = sorted(path.rglob("*zero_pp_rank_*_optim_states.pt")) if path.is_dir() else []
    if zero_stage is None:
        if optim:
            raise ConfigError(f"resume={path}: a DeepSpeed ZeRO checkpoint; resume it with the strategy it was written with "
                              "(strategy=zero2 or zero3, or a +cluster preset)")
        return
    if not path.is_dir():
        raise ConfigError(f"resume={path}: a single-file checkpoint, written without ZeRO; resume it without ZeRO "
                          "(strategy=auto or ddp), or start a new run directory")
    if not optim:
        return  # not a layout this check knows: DeepSpeed will say
    tag = optim[0].parent
    saved_world = len(list(tag.glob("*zero_pp_rank_*_optim_states.pt")))
    saved_stage = 3 if any(tag.glob("zero_pp_rank_*_model_states.pt")) else 2
    if (saved_stage, saved_world) != (zero_stage, world_size):
        raise ConfigError(
            f"resume={path}: written under ZeRO-{saved_stage} by {saved_world} rank(s), and this run is ZeRO-{zero_stage} "
            f"on {world_size}; DeepSpeed resumes a checkpoint under its own stage and number of ranks. Resume with "
            f"strategy=zero{saved_stage} on {saved_world} GPU(s), or start a new run directory from its weights "
            f"(the export, or DeepSpeed's zero_to_fp32.py in the checkpoint)"
        )


def optimizer_offloaded(strategy) -> bool:
    """True when DeepSpeed keeps the optimizer states and step on the CPU (strategy.offload_optimizer)."""
    config = getattr(strategy, "config", None) or {}
    return bool(config.get("zero_optimization", {}).get("offload_optimizer"))


@contextmanager
def outside_zero_init():
    """Suspend DeepSpeed's zero.Init inside the block (Lightning runs configure_model inside it
    under ZeRO-3). Wrapper modules built there (activation checkpointing, torch.compile) have no
    parameters of their own, and zero.Init's hook on every new module's constructor recurses
    forever through CheckpointWrapper's attribute forwarding."""
    try:
        from deepspeed.runtime.zero import partition_parameters as zero_init
    except ImportError:
        yield
        return
    active = zero_init.top_level_context is not None
    if active:
        zero_init.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            zero_init.restore_init_context()


def is_partitioned(module: torch.nn.Module) -> bool:
    """True when ZeRO-3 holds the module's parameters in partitions (`p.ds_tensor`): a forward,
    and gathering weights, are then collectives every rank must join."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters of the whole module, elements this rank holds): equal unless ZeRO-3 built it
    partitioned (each parameter then an empty placeholder plus this rank's `ds_tensor`)."""
    params = list(module.parameters())
    whole = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return whole, sum(getattr(p, "ds_tensor", p).numel() for p in params)


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
