"""Multi-axis rotary embeddings: head_dim is split between the t, h and w axes, each rotated by
its own coordinate. Positions may be fractional (audio tokens between video frames)."""

import torch


def rope_angles(positions: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """positions (N, n_axes) -> angles (N, head_dim // 2), float32."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
        angles.append(positions[:, axis, None].float() * freqs)
    return torch.cat(angles, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, N, H, D) by angles given as cos/sin (N, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf.unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)
