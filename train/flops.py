"""Model FLOPs of a training step, for throughput and MFU logging.

Counted as in DESIGN.md: 6 * active_params * tokens for the matmuls (forward + backward) plus
12 * layers * tokens^2 * dim for attention. A token only touches its own modality's weights in a
modality block, so the active parameters are the shared blocks plus one weight set per
modality block."""

from model import AVTransformer

H100_BF16_DENSE_FLOPS = 989e12


def active_params_per_token(model: AVTransformer) -> int:
    total = 0
    for block in model.blocks:
        weights = next(iter(block.weights.values()))
        total += sum(p.numel() for p in weights.parameters())
    return total


def train_flops_per_sample(active_params: int, n_layers: int, dim: int, n_tokens: int) -> float:
    return 6.0 * active_params * n_tokens + 12.0 * n_layers * n_tokens**2 * dim
