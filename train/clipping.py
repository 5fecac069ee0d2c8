"""Gradient clipping by the total norm, folded into the fused AdamW step when it can be.

Clipping scales every gradient by min(1, max_norm / (norm + 1e-6)). `clip_grad_norm_` does that
as one more pass over all the gradients (read and write) between the norm and the optimizer
step: 6 ms of the proxy's 440 ms step on an H200 (2.58B parameters, docs/performance.md). torch's
fused Adam/AdamW kernels already divide each gradient by the optimizer's `grad_scale` tensor when
it is set (the attribute torch.amp.GradScaler sets to unscale inside the step), so the same
scaling, set there as a divisor, costs nothing. The runs are bf16 or fp32, with no loss scaling
(fp16 precision is refused at the start, train/stages.py). Under DeepSpeed the engine clips and
steps, and nothing here runs."""

import math

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn


def _raw(optimizer):
    # Lightning's wrapper forwards attribute reads to the optimizer but keeps attribute writes:
    # a grad_scale set on it would never reach the step.
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def folds_into_step(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer whose step divides the gradients by its `grad_scale` attribute:
    torch's fused Adam and AdamW."""
    optimizer = _raw(optimizer)
    return bool(getattr(optimizer, "defaults", {}).get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


def clip_gradients(optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `parameters` to a total 2-norm of `max_norm` (inf: no clipping) and
    return the norm before clipping, as clip_grad_norm_ does. With a fused optimizer the
    gradients are left as they are and the optimizer's next step applies the clip to every
    parameter it updates: `parameters` must be the optimizer's. Call `release(optimizer)` after
    that step."""
    optimizer = _raw(optimizer)
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.zeros(())
    norm = nn.utils.get_total_norm([p.grad for p in parameters])
    if math.isinf(max_norm):
        return norm
    if folds_into_step(optimizer):
        # Division by max(1, (norm + 1e-6) / max_norm) is clip_grad_norm_'s multiplication by
        # min(1, max_norm / (norm + 1e-6)); a float32 tensor on the device (what the fused kernel
        # reads, whatever the gradients' dtype), so no host sync.
        optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    else:
        nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def release(optimizer: torch.optim.Optimizer) -> None:
    """Forget the clip a step has applied, so the next step without clipping does not reuse it."""
    vars(_raw(optimizer)).pop("grad_scale", None)
