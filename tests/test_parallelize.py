"""Training techniques applied from outside the model (train/parallelize.py): activation
checkpointing modes give the same gradients and recompute what they promise, blocks compile
without graph breaks, and the attention kernel list and priority are applied."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from model import AVTransformer, Segment
from model.block import BlockContext
from model.transformer import rope_tables
from test_model import AUDIO, TEXT, VIDEO, make_inputs, randomized, tiny_args
from train.parallelize import ATTENTION_BACKENDS, apply_activation_checkpointing, apply_compile, attention_backends


def _model(mode: str) -> AVTransformer:
    torch.manual_seed(0)
    model = randomized(AVTransformer(tiny_args()), std=0.1)
    apply_activation_checkpointing(model, mode)
    return model


def _loss(model, inputs, layout, t):
    return sum(o.square().mean() for o in model(inputs, layout, t) if o is not None)


def _backward_flops(model, inputs, layout, t) -> int:
    loss = _loss(model, inputs, layout, t)
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_gradients(mode):
    plain, ckpt = _model("none"), _model(mode)
    inputs, layout, t = make_inputs(plain, [TEXT, VIDEO, AUDIO])
    _loss(plain, inputs, layout, t).backward()
    _loss(ckpt, inputs, layout, t).backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in ckpt.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


class _OpCount(TorchDispatchMode):
    """Every aten op that runs inside, counted."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(model, inputs, layout, t) -> int:
    loss = _loss(model, inputs, layout, t)
    with _OpCount() as counter:
        loss.backward()
    return counter.ops


def test_selective_checkpointing_recomputes_no_matmul():
    """Full checkpointing re-runs each block's matmuls in the backward pass; selective keeps their
    outputs, so its backward does exactly the FLOPs of no checkpointing at all."""
    inputs, layout, t = make_inputs(_model("none"), [TEXT, VIDEO, AUDIO])
    with attention_backends(("math",)):  # attention as bmm, which the FLOP counter sees on CPU
        flops = {mode: _backward_flops(_model(mode), inputs, layout, t) for mode in ("none", "full", "selective")}
    assert flops["selective"] == flops["none"]
    assert flops["full"] > 1.3 * flops["none"]  # + one forward of the blocks (half the backward)


def test_selective_checkpointing_recomputes_the_elementwise_ops():
    """Selective is checkpointing, not its absence: every block is wrapped, and its backward runs
    more ops than no checkpointing (the recomputed norms, modulation, RoPE, SiLU) and fewer than
    full checkpointing (which also re-runs the matmuls and attention)."""
    models = {mode: _model(mode) for mode in ("none", "full", "selective")}
    assert all(isinstance(b, CheckpointWrapper) for b in models["selective"].blocks)
    inputs, layout, t = make_inputs(models["none"], [TEXT, VIDEO, AUDIO])
    ops = {mode: _backward_ops(m, inputs, layout, t) for mode, m in models.items()}
    assert ops["none"] < ops["selective"] < ops["full"], ops


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_blocks_compile_without_graph_breaks(mode):
    model = _model(mode)
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    x = model._embed(inputs, layout)
    _, t_mod = model.time(t.reshape(-1))
    cos, sin = rope_tables(layout, x.device)
    mask = torch.ones(x.shape[0], 1, 1, layout.n_tokens, dtype=torch.bool)
    ctx = BlockContext(layout.runs(False), layout.runs(True), t_mod.unflatten(0, t.shape), cos, sin, mask)
    for i in (0, model.args.n_modality_in):  # a ModalityBlock and a SharedBlock
        explained = torch._dynamo.explain(model.blocks[i])(x, ctx)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_compiled_blocks_take_every_text_length_after_one_recompile():
    """Training cuts the text to each batch's captions (RunConfig.trim_text), so the sequence
    length changes from batch to batch. A compiled block compiles with static shapes first and
    once more at the first other length, with that size dynamic; the dynamic graph serves every
    later length (a graph per length would pass the recompile limit at 64 caption lengths) and
    computes what the eager block does."""
    torch._dynamo.reset()  # no graph of an earlier test's block may serve this one,
    rope_tables.cache_clear()  # nor a cached table that dynamo marked dynamic before
    counters.clear()
    torch.manual_seed(0)
    eager = randomized(AVTransformer(tiny_args(n_modality_in=0, n_modality_out=0)), std=0.1)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    graphs = []
    for length in (8, 3, 20, 13):  # training's forward and backward
        inputs, layout, t = make_inputs(eager, [Segment("text", "condition", (length,)), VIDEO, AUDIO])
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            losses.append(_loss(model, inputs, layout, t))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 2, 2, 2]


def test_attention_backend_order():
    model = _model("none")
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    with torch.no_grad():
        reference = model(inputs, layout, t)[1]
        # On CPU cuDNN cannot run: the next backend in the list takes over.
        with attention_backends(("cudnn", "math")):
            torch.testing.assert_close(model(inputs, layout, t)[1], reference, rtol=1e-4, atol=1e-5)
        with attention_backends(("cudnn",)):
            with pytest.raises(RuntimeError, match="No viable backend"):
                model(inputs, layout, t)
    with pytest.raises(ValueError, match=r"attention_backends=\['fa9'\]: choose from cudnn, flash"):
        attention_backends(("fa9",))


def test_attention_backend_priority_is_set_and_restored():
    """The order is PyTorch's kernel priority inside the block (on CUDA it picks the first kernel
    that can take a call; CPU has its own fixed order, so this reads the setting itself) and the
    previous priority comes back after."""
    before = torch._C._get_sdp_priority_order()
    order = ("cudnn", "math", "flash", "efficient")
    with attention_backends(order):
        inside = torch._C._get_sdp_priority_order()
    assert inside[: len(order)] == [int(ATTENTION_BACKENDS[b]) for b in order]
    assert torch._C._get_sdp_priority_order() == before
