"""Training techniques applied to the model from the outside (torchtitan's parallelize.py
pattern): the attention kernel order, activation checkpointing per block, then torch.compile per
block. The model's own code never knows about any of them. Sharding (DeepSpeed ZeRO) is the
strategy's job, in the Trainer."""

import contextlib
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

ATTENTION_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# cuDNN first: on H100 it runs 646 fwd / 579 fwd+bwd TFLOP/s against 367 / 331 for PyTorch's
# default flash kernel (../shared/bench/h100_reference_2026-11-22.json). A backend that cannot take
# a call (e.g. a mask on flash, or any GPU kernel on CPU) is skipped for the next one.
DEFAULT_ATTENTION_ORDER = ("cudnn", "flash", "efficient", "math")

AC_MODES = ("none", "full", "selective")

# Selective checkpointing keeps what is expensive to recompute (every matmul and the attention
# kernels) and recomputes only the cheap elementwise work: norms, modulation, RoPE, SiLU, gates.
# FP8 matmuls (train/float8.py) reach the policy as aten.mm on torchao's float8 tensors, eager
# and compiled: they are kept like the rest, and their casts recomputed.
_ATTENTION_OPS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)
SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default} | {
    getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS if hasattr(torch.ops.aten, name)
}
# Windowed attention (model/window.py) reaches the policy as FlexAttention's higher-order op, on
# a GPU only (CPU runs the window through SDPA): kept too (not run on a GPU yet).
SAVED_OPS.add(torch.ops.higher_order.flex_attention)


def attention_backends(order=DEFAULT_ATTENTION_ORDER) -> contextlib.AbstractContextManager:
    """Scaled-dot-product-attention kernels to use, in priority order, for what runs inside the
    context (forward and backward; a compiled graph bakes in the kernel chosen when it is traced)."""
    unknown = [b for b in order if b not in ATTENTION_BACKENDS]
    if unknown or not order:
        raise ValueError(f"attention_backends={list(order)}: choose from {', '.join(ATTENTION_BACKENDS)}")
    return sdpa_kernel([ATTENTION_BACKENDS[b] for b in order], set_priority=True)


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> None:
    """full: keep only each block's input and recompute the block in the backward pass.
    selective: keep matmul and attention outputs, recompute the elementwise ops in between."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing={mode!r}: choose from {', '.join(AC_MODES)}")
    if mode == "none":
        return
    kwargs = {"context_fn": partial(create_selective_checkpoint_contexts, _selective_policy)} if mode == "selective" else {}
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)


# Compiled graphs one block function may hold (torch's recompile_limit, 8 by default). A graph is
# compiled per block kind (shared or per-modality) x grad mode (training or sampling/teacher) x
# key mask or not x the layout's segments, each first with static shapes and, once a size changes
# (the text cut to a batch's captions, another aspect-ratio bucket, another batch size), once more
# with that size dynamic (PyTorch's automatic dynamic shapes), which then serves every later size.
# Distillation alone runs student, critic and teacher forwards at two batch sizes, with and without
# grad, and samples; past the limit fullgraph is a hard error.
COMPILED_VARIANTS_LIMIT = 64


def apply_compile(model: nn.Module, dynamic: bool | None = None) -> str:
    """Compile each block separately: blocks repeat, so one compiled graph serves every layer of a
    kind, and the Python loop over segments in a block is unrolled per layout. fullgraph: a graph
    break is an error here, not a silent fall back to eager for part of the block. Returns what
    was compiled, for the log. dynamic: torch.compile's; None (training's) compiles static shapes
    first and a dynamic size for what changes (above); False keeps every shape static (a
    benchmark of one fixed shape).

    A `forward` is compiled, not the module: the block stays where it is (no wrapper module, no
    renamed weights) and the module's hooks run eagerly around the compiled code. Which forward:
    - the checkpoint wrapper's when there is one, so the compiled graph holds the checkpoint and
      its selective policy (a policy outside compiled code cannot see the ops inside: selective
      would recompute everything, as full does);
    - under ZeRO-3, the block's own, inside the checkpoint wrapper. DeepSpeed gathers parameters
      in module hooks that dynamo cannot trace (torch.compiler.disable'd: with fullgraph, an
      error), and its forward prologue fails on torch.compile's wrapper module. Each block is
      made a ZeRO-3 leaf: DeepSpeed gathers all of the block's parameters in the block's own
      hooks, as one unit (as FSDP would shard it), and hooks none of its children, which run
      inside the compiled code. Selective checkpointing cannot be kept there: fit() refuses it."""
    from train.strategy import is_partitioned  # not at the top: train.strategy imports train.config, which imports this

    partitioned = is_partitioned(model)
    targets = [getattr(b, "_checkpoint_wrapped_module", b) if partitioned else b for b in model.blocks]
    if partitioned:
        from deepspeed.utils import set_z3_leaf_module

        for block in targets:
            set_z3_leaf_module(block, True)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS_LIMIT)
    for target in targets:
        # dynamic=None: static shapes first, a dynamic size for what changes (see above). Static
        # only (False) would compile a graph per caption length when the text is trimmed.
        target.forward = torch.compile(target.forward, dynamic=dynamic, fullgraph=True)
    return f"{len(targets)} blocks compiled" + (" as ZeRO-3 leaves" if partitioned else "")
