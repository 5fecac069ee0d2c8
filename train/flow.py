"""Rectified-flow math, independent of any network.

Convention: t = 0 is data, t = 1 is noise; x_t = (1 - t) x0 + t eps; the network predicts the
velocity dx/dt = eps - x0. Sampling integrates from t = 1 down to t = 0.
"""

import math
from collections.abc import Callable, Sequence

import torch


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp t towards noise: shift * t / (1 + (shift - 1) * t). shift = 1 is the identity; larger
    shifts spend more time at high noise, which larger token counts need (SD3, sec. 5.3.2)."""
    return shift * t / (1 + (shift - 1) * t)


def time_unshift(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The inverse of time_shift: the t that time_shift maps to the given value."""
    return t / (shift - (shift - 1) * t)


def shift_for_tokens(n_tokens: int, base_tokens: int, base_shift: float, max_shift: float) -> float:
    """Resolution-dependent shift: sqrt(n / base) scaling of the signal-to-noise ratio, so a
    sequence of base_tokens gets base_shift and 4x the tokens gets 2x the shift (capped)."""
    return min(max_shift, base_shift * math.sqrt(n_tokens / base_tokens))


def sample_timesteps(
    batch: int, shift: float, logit_mean: float, logit_std: float, generator: torch.Generator, device=None
) -> torch.Tensor:
    """Logit-normal timesteps (SD3), then shifted. Returns (batch,) in (0, 1)."""
    u = torch.randn(batch, generator=generator) * logit_std + logit_mean
    # non_blocking: drawn on the host (reproducible everywhere); a blocking copy would sync the stream
    return time_shift(torch.sigmoid(u), shift).to(device, non_blocking=True)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t (B,) broadcast over the other dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean squared error per sample, in float32."""
    return (pred.float() - target.float()).square().flatten(1).mean(1)


def weighted_loss(per_modality: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Joint loss: weighted sum of per-modality means. Each modality is averaged over its own
    elements first, so audio (a small fraction of the tokens) is not drowned by video."""
    return sum(weights.get(m, 1.0) * loss.mean() for m, loss in per_modality.items())


def sampling_schedule(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) times from 1 to 0, uniform then shifted (the teacher's shifted schedule)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in the standard form uncond + s * (cond - uncond): s = 1 is the
    conditional prediction, s = 0 the unconditional one."""
    return uncond + scale * (cond - uncond)


VelocityFn = Callable[[list[torch.Tensor], float], list[torch.Tensor]]


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: Sequence[torch.Tensor], schedule: torch.Tensor) -> list[torch.Tensor]:
    """Integrate dx/dt = v(x, t) from schedule[0] (=1, pure noise) to schedule[-1] (=0) with Euler
    steps. Several tensors (video and audio latents) move together, one velocity call per step."""
    xs = [n.clone() for n in noise]
    for t_now, t_next in zip(schedule[:-1].tolist(), schedule[1:].tolist()):
        vs = velocity(xs, t_now)
        xs = [x + (t_next - t_now) * v.to(x.dtype) for x, v in zip(xs, vs)]
    return xs
