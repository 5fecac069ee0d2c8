"""Checks a cluster preset (conf/cluster/) against where the run was started, before any process
group exists: enough GPUs, the launcher's variables (SLURM or torchrun) for the processes asked
for, and the estimated memory per GPU (train/memory.py). Each failure is one ConfigError naming
the preset, what it asks for and what to do."""

import os
from dataclasses import dataclass

import torch

from train.config import ConfigError, _require
from train.memory import MemoryEstimate

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NODELIST")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class ClusterConfig:
    """The `cluster` node of a preset: what the hardware is (the rest of a preset sets trainer,
    strategy and data options), and how launch/ submits it."""

    name: str = "local"
    gpu_memory_gb: float = 0.0  # per GPU; 0: no memory check (CPU runs)
    cpus_per_task: int = 2
    slurm_partition: str | None = None
    slurm_time: str = "48:00:00"
    slurm_signal_seconds: int = 180  # SIGUSR1 this long before the time limit: checkpoint + requeue

    def __post_init__(self):
        _require(self.gpu_memory_gb >= 0, "cluster.gpu_memory_gb", self.gpu_memory_gb, "must be >= 0")
        _require(self.cpus_per_task >= 1, "cluster.cpus_per_task", self.cpus_per_task, "must be >= 1")
        _require(self.slurm_signal_seconds >= 0, "cluster.slurm_signal_seconds", self.slurm_signal_seconds, "must be >= 0")


def runs_on_gpu(trainer_cfg: dict) -> bool:
    """The Trainer's accelerator is a GPU: named, or "auto" (Lightning's default) on a machine with one."""
    accelerator = trainer_cfg.get("accelerator", "auto")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def devices_per_node(trainer_cfg: dict) -> int:
    """trainer.devices as Lightning reads it: a count, a list of GPU ids or a string of either
    ("2", "0,1"), or "auto"/-1: every GPU of this node on a GPU run (the node a launcher starts
    each rank on has as many as this one), one process on the CPU."""
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            devices = -1
        elif "," in text:
            devices = [d for d in text.split(",") if d.strip()]
        else:
            devices = int(text)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices == -1:
        return max(torch.cuda.device_count(), 1) if runs_on_gpu(trainer_cfg) else 1
    return int(devices)


def world_size(trainer_cfg: dict) -> int:
    """Processes the Trainer will start: devices per node x num_nodes."""
    return devices_per_node(trainer_cfg) * int(trainer_cfg.get("num_nodes", 1))


def check_launch(cluster: ClusterConfig, trainer_cfg: dict, environ=os.environ) -> None:
    """The processes the preset asks for can exist here."""
    devices, nodes = trainer_cfg.get("devices", "auto"), int(trainer_cfg.get("num_nodes", 1))
    wants_gpu = trainer_cfg.get("accelerator") in ("gpu", "cuda")
    if wants_gpu:
        have = torch.cuda.device_count()
        if devices_per_node(trainer_cfg) > have:
            raise ConfigError(
                f"cluster={cluster.name}: trainer.devices={devices} GPUs per node, but this machine has {have}; run it where "
                "the GPUs are (launch/), or lower trainer.devices, or use +cluster=local"
            )
    total = world_size(trainer_cfg)
    if "SLURM_JOB_ID" in environ and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        missing = [v for v in SLURM_VARS if v not in environ]
        if missing:
            raise ConfigError(
                f"cluster={cluster.name}: inside SLURM job {environ['SLURM_JOB_ID']} but {', '.join(missing)} "
                "not set: start the ranks with srun (launch/slurm.py writes the batch script)"
            )
        if int(environ["SLURM_NTASKS"]) != total:
            raise ConfigError(
                f"cluster={cluster.name}: trainer.num_nodes={nodes} x trainer.devices={devices} = {total} processes, but "
                f"SLURM started {environ['SLURM_NTASKS']} tasks; submit with --nodes={nodes} --ntasks-per-node={devices}"
            )
    elif nodes > 1:
        missing = [v for v in TORCHRUN_VARS if v not in environ]
        if missing:
            raise ConfigError(
                f"cluster={cluster.name}: trainer.num_nodes={nodes} needs a multi-node launcher, and neither SLURM's nor "
                f"torchrun's variables are set (missing {', '.join(missing)}): submit with launch/slurm.py or start every "
                "node with launch/torchrun.sh"
            )


def check_memory(cluster: ClusterConfig, est: MemoryEstimate, what: str, zero_stage: int, tokens: int, trainer_cfg: dict) -> None:
    """The estimated memory per GPU (train/memory.py) fits cluster.gpu_memory_gb (no check when it
    is 0). what: the networks, e.g. "14.97B parameters" or "student + critic + teacher of 14.97B"."""
    if cluster.gpu_memory_gb <= 0 or est.total <= cluster.gpu_memory_gb:
        return
    stage = f"ZeRO-{zero_stage}" if zero_stage else "no ZeRO"
    raise ConfigError(
        f"cluster={cluster.name}: {what} with {stage} over {world_size(trainer_cfg)} GPUs and "
        f"{tokens} tokens per micro-batch need about {est.total:.0f} GiB per GPU ({est.table()}), more than its "
        f"{cluster.gpu_memory_gb:g} GB: use strategy=zero3, activation_checkpointing=full, more GPUs, "
        "strategy.offload_optimizer=true (optimizer states in CPU memory) or a smaller data.loader.batch_size / clip"
    )


def check_zero_parameter_alignment(model: torch.nn.Module, zero_stage: int, trainer_cfg: dict) -> None:
    """Refuse, on GPUs, ZeRO runs whose parameters would sit off 16-byte alignment.

    DeepSpeed keeps the module's parameters as views into one flat buffer, each at the running
    sum of the sizes before it (ZeRO-1/2 on every rank; ZeRO-3 when one rank holds everything,
    so nothing is gathered). A parameter of, say, 12 bf16 elements (a 12-head gate's bias, 24
    bytes) leaves every parameter after it unaligned (tests/test_zero.py checks this on CPU).
    On an H200 that stopped a run at its first step: ZeRO-3 on one GPU, model.n_heads=12 at dim
    1536, compiled blocks, "CUDA error: misaligned address" after CUBLAS_STATUS_EXECUTION_FAILED
    in a fused-bias GEMM; with n_heads=16 the same run trained. Most likely the unaligned weights,
    though the failing kernel was not isolated: the same 12-head run with compile=false trained
    its 3 steps, for no reason we know (DeepSpeed's own linear, on there, runs the same GEMM), so
    it is refused as well. ZeRO-3 across several ranks gathers each parameter into a fresh tensor
    (DeepSpeed's all-gather handles) and passes. ZeRO-1/2 were not run on a GPU with such sizes;
    their parameters are the same unaligned views, so they are refused too.
    `model`: a meta-device copy of the network (the distill critic's GAN head, built later, ends
    the parameter order and unaligns nothing)."""
    if not runs_on_gpu(trainer_cfg) or zero_stage == 0:
        return
    if zero_stage == 3 and world_size(trainer_cfg) > 1:
        return
    itemsize = 2 if "16" in str(trainer_cfg.get("precision", "")) else 4  # DeepSpeed holds the weights in the run's precision
    odd = [f"{name} ({p.numel()})" for name, p in model.named_parameters() if p.numel() * itemsize % 16]
    if odd:
        shown = ", ".join(odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        raise ConfigError(
            f"ZeRO-{zero_stage}{' on one GPU' if zero_stage == 3 else ''}: parameters whose size is not a multiple of 16 "
            f"bytes ({shown}) leave the parameters after them unaligned in DeepSpeed's flat buffer, where a run on an H200 "
            "failed with 'misaligned address'; use a model whose parameter sizes are multiples of 8 (model.n_heads a "
            "multiple of 8), " + ("or more than one GPU" if zero_stage == 3 else "or strategy=zero3 on more than one GPU")
        )
