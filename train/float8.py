"""FP8 matmuls for the blocks' linear layers, through torchao's float8 training (the converter
torchtitan applies with `--model.converters float8`).

Each of a block's four projections (qkv, out, w_gate_up, w_down: nearly all of its matmul FLOPs)
becomes a torchao Float8Linear: its input, weight and, in the backward, the output gradient are
cast to float8 with a scale computed from the tensor's current absolute maximum ("dynamic"
scaling), multiplied on the FP8 tensor cores (torch._scaled_mm, 2x the bf16 rate on an H100) and
returned in the input's precision. Attention, norms, embedders, output heads and the small
modulation and head-gate projections stay as they are.

Recipes (torchao's names):
- tensorwise: one scale per tensor; the fastest.
- rowwise: one scale per row of each operand; more accurate, somewhat slower.
- rowwise_with_gw_hp: rowwise, with the weight gradient computed in high precision.

The swap keeps every Parameter object and name: EMA, DeepSpeed (ZeRO-3 partitions included),
checkpoints and exports see the same weights; an exported model loads without torchao. Apply it
before activation checkpointing and compile (torchtitan's order), so the compiled graph holds the
casts and the scaled matmuls.

On CPU the tensorwise recipe runs (PyTorch's CPU _scaled_mm takes one scale per tensor), slowly:
that is for tests. A GPU needs FP8 tensor cores: compute capability 8.9 (Ada) or 9.0 (Hopper) and up.
"""

import dataclasses

import torch
from torch import nn

FLOAT8_RECIPES = ("none", "tensorwise", "rowwise", "rowwise_with_gw_hp")
# The block projections that carry the matmul FLOPs (model/block.py BlockWeights).
CONVERTED_LAYERS = ("qkv", "out", "w_gate_up", "w_down")


def check_float8(recipe: str, device: torch.device) -> None:
    """Refuse a recipe the device cannot run, before any module is changed (ConfigError: one line
    from the command line; the stages call it before they start)."""
    from train.config import ConfigError  # not at the top: train.config imports this module

    if recipe not in FLOAT8_RECIPES:
        raise ConfigError(f"float8={recipe!r}: choose from {', '.join(FLOAT8_RECIPES)}")
    if recipe == "none":
        return
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ConfigError(
                f"float8={recipe}: {torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) "
                "has no FP8 tensor cores (8.9 and up: Ada, Hopper); use float8=none"
            )
    elif device.type == "cpu":
        if recipe != "tensorwise":
            raise ConfigError(f"float8={recipe}: on CPU only float8=tensorwise runs (one scale per tensor); use it, or none")
    else:
        raise ConfigError(f"float8={recipe}: runs on CUDA GPUs (and, for tests, tensorwise on CPU), not on {device.type}")


def is_converted_layer(module: nn.Module, fqn: str) -> bool:
    """A block projection whose dimensions _scaled_mm takes (multiples of 16)."""
    return (
        isinstance(module, nn.Linear)
        and fqn.split(".")[-1] in CONVERTED_LAYERS
        and ".weights." in f".{fqn}"
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def apply_float8(model: nn.Module, recipe: str, device: torch.device, pad_inner_dim: bool | None = None) -> str:
    """Swap the block projections of `model` for torchao Float8Linear in place. Returns what was
    converted, for the log. recipe "none" leaves the model as it is. pad_inner_dim: None, on a GPU
    only (below); tests set it to trace the GPU's path on CPU."""
    check_float8(recipe, device)
    if recipe == "none":
        return "float8: none"
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    # pad_inner_dim: on a GPU _scaled_mm needs the inner dimension to be a multiple of 16, and in
    # the weight gradient that is the token count (a trimmed caption, 108 audio latents for 5 s):
    # pad it with zeros. The CPU kernel has no such rule, and inductor's CPU code generation cannot
    # compile the padding of float8 tensors (PyTorch 2.11: no blendv for Float8_e5m2).
    pad = device.type == "cuda" if pad_inner_dim is None else pad_inner_dim
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), pad_inner_dim=pad)
    convert_to_float8_training(model, config=config, module_filter_fn=is_converted_layer)
    return f"float8 ({recipe}): {sum(isinstance(m, Float8Linear) for m in model.modules())} block projections"
