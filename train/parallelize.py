"""Training techniques applied to the model from the outside (torchtitan's parallelize.py
pattern): activation checkpointing per block, then torch.compile per block. The model's own code
never knows about either. Sharding (DeepSpeed ZeRO) is the strategy's job, in the Trainer."""

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of storing its activations."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: blocks repeat, so one compiled graph serves every layer of a
    kind, and the Python loop over segments in a block is unrolled per layout."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, dynamic=False)
