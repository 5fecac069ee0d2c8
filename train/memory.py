"""Memory per GPU of a training configuration, estimated before anything starts, so a ZeRO stage
that cannot hold the model fails with one message instead of an out-of-memory error on 64 GPUs
after the job waited in the queue. docs/training.md works the numbers for the 15B model.

Bytes per parameter under bf16 mixed precision (DeepSpeed's bf16 mode; Lightning's bf16-mixed
keeps the same fp32 master copy): bf16 weights 2, bf16 gradients 2, fp32 master weights 4, Adam
moments 4 + 4, fp32 EMA 4. Under 32-true: weights 4, gradients 4, moments 8, EMA 4 (no master).
ZeRO partitions over the data-parallel ranks: stage 1 the optimizer states (master + moments),
stage 2 also the gradients, stage 3 also the weights; our EMA follows the weights (whole under
stages 1-2, partitioned under stage 3). Activations of a transformer layer, per token, are about
34 x dim bytes in bf16 (Korthikanti et al. 2022, with flash attention: no s^2 term); activation
checkpointing keeps one dim-wide bf16 tensor per layer and recomputes one layer at a time.
DeepSpeed's offload moves the optimizer states (offload_optimizer) or the stage-3 weight
partitions (offload_parameters) to CPU memory; our EMA stays on the GPU.

The distill stage trains two networks of the teacher's size (student with its EMA, critic) next
to the frozen teacher, whose weights are partitioned (ZeRO-3, distill.teacher_partitioned), a
whole copy in the compute dtype (DeepSpeed's bf16: 2 bytes), or, without ZeRO, Lightning's fp32
parameters under bf16-mixed (4 bytes). Its generator update keeps the activations of both trained
networks (the GAN term backpropagates through the critic into the student; counted as the whole
critic, an upper bound: that forward stops after the GAN layer), and the critic update keeps the
critic's twice (fake clips whole, real clips up to the GAN layer). The guided teacher
runs cond + uncond, twice the tokens, under no_grad: one layer at a time, and a layer that keeps
nothing for a backward needs about half the bytes per token, so its working set is about one
recomputed training layer's.
"""

from dataclasses import dataclass

GIB = 1024**3
ACTIVATION_BYTES_PER_TOKEN_PER_DIM = 34
OVERHEAD_GIB = 4.0  # CUDA context, allocator fragmentation, communication buckets


@dataclass
class MemoryEstimate:
    weights: float  # GiB per GPU
    gradients: float
    optimizer: float
    ema: float
    activations: float
    frozen: float = 0.0  # networks without gradients (the distill stage's teacher)
    overhead: float = OVERHEAD_GIB

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema + self.activations + self.frozen + self.overhead

    def table(self) -> str:
        parts = ("weights", "gradients", "optimizer", "ema", "activations") + (("frozen",) if self.frozen else ()) + ("overhead",)
        return ", ".join(f"{p} {getattr(self, p):.1f}" for p in parts) + f" = {self.total:.1f} GiB"


def _mixed(precision: str) -> bool:
    return precision.startswith("bf16") or precision.startswith("16")


def _layer_activations(tokens: int, dim: int) -> float:
    """Bytes one layer keeps for its backward."""
    return ACTIVATION_BYTES_PER_TOKEN_PER_DIM * tokens * dim


def _trained_activations(n_layers: int, dim: int, tokens: int, activation_checkpointing: bool) -> float:
    """Bytes a network that trains keeps for its backward: each block's input with checkpointing,
    every activation without."""
    per_layer = 2 * tokens * dim if activation_checkpointing else _layer_activations(tokens, dim)
    return n_layers * per_layer


@dataclass
class TrainingSetup:
    """What the memory per GPU depends on. n_params: one network's parameters. zero_stage 0: no
    ZeRO (DDP or one device)."""

    n_params: int
    n_layers: int
    dim: int
    tokens_per_micro_batch: int
    zero_stage: int
    data_parallel: int
    precision: str = "bf16-mixed"
    ema: bool = True
    activation_checkpointing: bool = True
    offload_optimizer: bool = False
    offload_parameters: bool = False


def _trained_state(s: TrainingSetup) -> dict[str, float]:
    """GiB per GPU of one trained network's weights, gradients and optimizer states, and of its
    EMA (which follows the weights: whole under stages 1-2, partitioned under stage 3)."""
    weight_b, grad_b, optim_b = (2, 2, 12) if _mixed(s.precision) else (4, 4, 8)  # bf16: fp32 master + two moments
    n = max(1, s.data_parallel)
    return {
        "weights": 0.0 if s.offload_parameters else s.n_params * weight_b / (n if s.zero_stage >= 3 else 1) / GIB,
        "gradients": s.n_params * grad_b / (n if s.zero_stage >= 2 else 1) / GIB,
        "optimizer": 0.0 if s.offload_optimizer else s.n_params * optim_b / (n if s.zero_stage >= 1 else 1) / GIB,
        "ema": s.n_params * 4 / (n if s.zero_stage >= 3 else 1) / GIB if s.ema else 0.0,
    }


def estimate_per_gpu(s: TrainingSetup) -> MemoryEstimate:
    """Pretraining: one trained network (with its EMA)."""
    activations = _trained_activations(s.n_layers, s.dim, s.tokens_per_micro_batch, s.activation_checkpointing)
    if s.activation_checkpointing:
        activations += _layer_activations(s.tokens_per_micro_batch, s.dim)  # the block being recomputed
    return MemoryEstimate(**_trained_state(s), activations=activations / GIB)


def estimate_distill_per_gpu(s: TrainingSetup, teacher_partitioned: bool = True) -> MemoryEstimate:
    """Distillation: student (+ EMA) and critic trained, the teacher frozen, each of s.n_params
    (the GAN head's few parameters are left out)."""
    one = _trained_state(s)  # the student's; the critic's the same without an EMA
    n = max(1, s.data_parallel)
    if s.zero_stage >= 3 and teacher_partitioned:
        frozen_b = 0 if s.offload_parameters else (2 if _mixed(s.precision) else 4) / n
    elif s.zero_stage >= 1:
        frozen_b = 2 if s.precision.startswith("bf16") else 4  # a whole copy, cast to bf16 only (train/strategy.py)
    else:
        frozen_b = 2 if s.precision == "bf16-true" else 4  # Lightning keeps fp32 parameters under *-mixed
    activations = 2 * _trained_activations(s.n_layers, s.dim, s.tokens_per_micro_batch, s.activation_checkpointing)
    activations += _layer_activations(s.tokens_per_micro_batch, s.dim)  # the layer working now (see above)
    return MemoryEstimate(
        weights=2 * one["weights"],
        gradients=2 * one["gradients"],
        optimizer=2 * one["optimizer"],
        ema=one["ema"],
        activations=activations / GIB,
        frozen=s.n_params * frozen_b / GIB,
    )
