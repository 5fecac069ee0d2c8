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
    overhead: float = OVERHEAD_GIB

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema + self.activations + self.overhead

    def table(self) -> str:
        parts = ("weights", "gradients", "optimizer", "ema", "activations", "overhead")
        return ", ".join(f"{p} {getattr(self, p):.1f}" for p in parts) + f" = {self.total:.1f} GiB"


def estimate_per_gpu(
    n_params: int,
    n_layers: int,
    dim: int,
    tokens_per_micro_batch: int,
    zero_stage: int,
    data_parallel: int,
    precision: str = "bf16-mixed",
    ema: bool = True,
    activation_checkpointing: bool = True,
) -> MemoryEstimate:
    """zero_stage 0: no ZeRO (DDP or one device)."""
    if precision.startswith("bf16") or precision.startswith("16"):
        weight_b, grad_b, optim_b = 2, 2, 12  # optimizer: fp32 master + two moments
    else:
        weight_b, grad_b, optim_b = 4, 4, 8
    n = max(1, data_parallel)
    per = {  # divisor per state kind, by stage
        "weights": n if zero_stage >= 3 else 1,
        "gradients": n if zero_stage >= 2 else 1,
        "optimizer": n if zero_stage >= 1 else 1,
    }
    act_per_layer = ACTIVATION_BYTES_PER_TOKEN_PER_DIM * tokens_per_micro_batch * dim
    if activation_checkpointing:
        activations = n_layers * 2 * tokens_per_micro_batch * dim + act_per_layer
    else:
        activations = n_layers * act_per_layer
    return MemoryEstimate(
        weights=n_params * weight_b / per["weights"] / GIB,
        gradients=n_params * grad_b / per["gradients"] / GIB,
        optimizer=n_params * optim_b / per["optimizer"] / GIB,
        ema=(n_params * 4 / per["weights"] / GIB) if ema else 0.0,
        activations=activations / GIB,
    )
