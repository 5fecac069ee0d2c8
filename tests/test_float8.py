"""FP8 block matmuls (train/float8.py) on CPU, where torchao's tensorwise recipe runs through
PyTorch's CPU _scaled_mm: exactly the block projections are converted, the weights stay the same
objects under the same names, outputs and gradients stay close to the unconverted model's, the
blocks still compile without graph breaks, and what cannot run is refused by name."""

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode
from torchao.float8.float8_linear import Float8Linear

from model import AVTransformer, Segment
from test_model import AUDIO, TEXT, VIDEO, make_inputs, randomized, tiny_args
from train.config import ConfigError, RunConfig
from train.float8 import apply_float8, check_float8
from train.parallelize import apply_activation_checkpointing, apply_compile, attention_backends

CPU = torch.device("cpu")


def _pair():
    torch.manual_seed(0)
    plain = randomized(AVTransformer(tiny_args()), std=0.1)
    fp8 = copy.deepcopy(plain)
    apply_float8(fp8, "tensorwise", CPU)
    return plain, fp8


def _outputs_and_grads(model, inputs, layout, t):
    outs = [o for o in model(inputs, layout, t) if o is not None]
    sum(o.square().mean() for o in outs).backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def _relative_error(a, b):
    """|a - b| / |b|, or |a| where b is zero (a gradient no loss reaches must stay zero)."""
    diff, ref = float((a.float() - b.float()).norm()), float(b.float().norm())
    return diff / ref if ref > 0 else diff


def test_converts_exactly_the_block_projections_and_keeps_the_weights():
    torch.manual_seed(0)
    model = AVTransformer(tiny_args())
    params_before, keys_before = dict(model.named_parameters()), list(model.state_dict())
    note = apply_float8(model, "tensorwise", CPU)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    expected = sorted(
        f"blocks.{i}.weights.{key}.{layer}"
        for i, block in enumerate(model.blocks)
        for key in block.weights
        for layer in ("qkv", "out", "w_gate_up", "w_down")
    )
    assert converted == expected and note == f"float8 (tensorwise): {len(expected)} block projections"
    # Same Parameter objects under the same names: EMA, ZeRO and optimizers hold them already,
    # and checkpoints/exports keep their keys (an export loads without torchao).
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys_before


def test_outputs_and_gradients_stay_close_to_the_unconverted_model():
    plain, fp8 = _pair()
    inputs, layout, t = make_inputs(plain, [TEXT, VIDEO, AUDIO])
    outs, grads = _outputs_and_grads(plain, inputs, layout, t)
    outs8, grads8 = _outputs_and_grads(fp8, inputs, layout, t)
    # e4m3 keeps 3 mantissa bits (about 6% per value); errors average down in the matmuls.
    for o8, o in zip(outs8, outs):
        assert 0 < _relative_error(o8, o) < 0.1
    moved = 0
    assert grads8.keys() == grads.keys()
    for name, g in grads.items():
        assert _relative_error(grads8[name], g) < 0.2, name
        moved += not torch.equal(grads8[name], g)
    assert moved > len(grads) // 2  # the FP8 path really ran: most gradients differ


def test_compiled_float8_blocks_match_eager_ones():
    """fullgraph compile of Float8Linear inside the blocks (a graph break would be an error);
    compiled and eager agree."""
    _, eager = _pair()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    inputs, layout, t = make_inputs(eager, [TEXT, VIDEO, AUDIO])
    outs, grads = _outputs_and_grads(eager, inputs, layout, t)
    outs_c, grads_c = _outputs_and_grads(compiled, inputs, layout, t)
    for oc, o in zip(outs_c, outs):
        assert _relative_error(oc, o) < 1e-3
    for name, g in grads.items():
        assert _relative_error(grads_c[name], g) < 1e-2, name


def test_gpu_padding_traces_with_a_dynamic_text_length():
    """The GPU's configuration (inner dimension zero-padded to a multiple of 16, for the weight
    gradient over a segment's tokens) under training's compile: static graphs at the first text
    length, dynamic ones at the second, none more at the third; gradients as eager, and as without
    the padding. Traced with AOT autograd but not code-generated: inductor's CPU backend cannot
    compile float8 padding."""
    torch.manual_seed(0)
    unpadded = randomized(AVTransformer(tiny_args()), std=0.1)
    eager = copy.deepcopy(unpadded)
    apply_float8(unpadded, "tensorwise", CPU)
    apply_float8(eager, "tensorwise", CPU, pad_inner_dim=True)
    compiled = copy.deepcopy(eager)
    for block in compiled.blocks:
        block.forward = torch.compile(block.forward, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    graphs = []
    for n in (8, 13, 21):
        inputs, layout, t = make_inputs(eager, [Segment("text", "condition", (n,)), VIDEO, AUDIO])
        _, grads = _outputs_and_grads(eager, inputs, layout, t)
        _, grads_c = _outputs_and_grads(compiled, inputs, layout, t)
        _, grads_u = _outputs_and_grads(unpadded, inputs, layout, t)
        for name, g in grads.items():
            assert _relative_error(grads_c[name], g) < 1e-3, (n, name)
            assert _relative_error(grads_u[name], g) < 1e-5, (n, name)  # zero padding changes no scale, no sum
        graphs.append(counters["stats"]["unique_graphs"])
        for m in (eager, compiled, unpadded):
            m.zero_grad(set_to_none=True)
    assert graphs[1] > graphs[0] > 0 and graphs[2] == graphs[1], graphs


def test_selective_checkpointing_keeps_the_fp8_matmuls():
    """The FP8 matmuls reach the selective policy as aten.mm on torchao's float8 tensors, so it
    keeps their outputs: its backward does the FLOPs of no checkpointing, while full
    checkpointing re-runs them."""
    _, model = _pair()
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    flops = {}
    for mode in ("none", "full", "selective"):
        m = copy.deepcopy(model)
        apply_activation_checkpointing(m, mode)
        with attention_backends(("math",)):  # attention as bmm, which the FLOP counter sees on CPU
            loss = sum(o.square().mean() for o in m(inputs, layout, t) if o is not None)
            with FlopCounterMode(display=False) as counter:
                loss.backward()
        flops[mode] = counter.get_total_flops()
    assert flops["selective"] == flops["none"] < flops["full"], flops


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match="float8=rowwise: on CPU only float8=tensorwise"):
        check_float8("rowwise", CPU)
    with pytest.raises(ValueError, match="float8='fp8': choose from none, tensorwise, rowwise"):
        check_float8("fp8", CPU)
    with pytest.raises(ConfigError, match="float8='e4m3'"):
        RunConfig(run_dir="x", float8="e4m3")
    model = AVTransformer(tiny_args())
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError):
        apply_float8(model, "rowwise", CPU)
    assert [type(m) for m in model.modules()] == before  # refused before anything was swapped


def test_pretraining_with_float8_learns_as_the_unconverted_model_does():
    """Through Lightning: configure_model converts the blocks, the loss on a fixed batch falls as
    far as without FP8 (within 20%), and the checkpoint holds the usual weight names."""
    from test_pretrain_module import fit, make_module

    final, keys = {}, {}
    for recipe in ("none", "tensorwise"):
        module = make_module()
        module.run = dataclasses.replace(module.run, float8=recipe)
        losses, trainer = fit(module, 150)
        final[recipe] = sum(losses[-10:]) / 10
        assert final[recipe] < 0.8 * sum(losses[:10]) / 10, (recipe, losses[:10], losses[-10:])
        converted = [n for n, m in module.model.named_modules() if isinstance(m, Float8Linear)]
        assert bool(converted) == (recipe != "none")
        keys[recipe] = list(module.state_dict())
    assert keys["tensorwise"] == keys["none"]
    assert abs(final["tensorwise"] - final["none"]) < 0.2 * final["none"], final


def test_distillation_converts_all_three_networks_and_trains():
    """student, critic and teacher all run FP8 block matmuls; the two trained ones move, the
    teacher stays frozen, and the losses stay finite."""
    from test_distill_module import fit, make_module

    module = make_module()
    module.run = dataclasses.replace(module.run, float8="tensorwise")
    teacher_before = [p.detach().clone() for p in module.teacher.parameters()]
    student_before = [p.detach().clone() for p in module.student.parameters()]
    _, trainer = fit(module, 4)
    for net in (module.student, module.critic.net, module.teacher):
        assert sum(isinstance(m, Float8Linear) for m in net.modules()) == 36  # (4 + 1 + 4 weight sets) x 4
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(student_before, module.student.parameters()))
    logged = trainer.callback_metrics
    assert all(torch.isfinite(logged[k]) for k in ("distill/critic_loss", "distill/dm_loss"))
