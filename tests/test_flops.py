"""The FLOP count behind perf/mfu and bench/: against a hand count, and against PyTorch's own
FLOP counter running the model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import AVTransformer, Segment
from test_model import AUDIO, TEXT, VIDEO, make_inputs, tiny_args
from train.flops import block_matmul_params, forward_flops, train_flops
from train.parallelize import attention_backends


def test_block_params_by_hand():
    a = tiny_args()  # dim 32, 4 heads of 8, 2 KV heads, SwiGLU 64, dynamic gate
    assert (a.dim, a.n_heads, a.head_dim, a.n_kv_heads, a.mlp_hidden, a.gate) == (32, 4, 8, 2, 64, "dynamic")
    qkv, out, mlp, gate = 32 * (32 + 2 * 2 * 8), 32 * 32, 3 * 32 * 64, 32 * 4
    assert block_matmul_params(a) == qkv + out + mlp + gate
    assert block_matmul_params(tiny_args(gate="scalar")) == qkv + out + mlp


def test_forward_flops_by_hand():
    """One shared block, one video segment, no time/head extras worth hiding: every term written out."""
    a = tiny_args(n_modality_in=0, n_shared=1, n_modality_out=0)
    seg = Segment("video", "generate", (a.video_channels, 2, 4, 4))
    layout = AVTransformer(a).layout([seg])
    n, d = layout.n_tokens, a.dim
    patch = a.video_channels * a.video_patch[0] * a.video_patch[1] * a.video_patch[2]
    by_hand = (
        2 * n * block_matmul_params(a)  # the block's weights
        + 4 * n * n * d  # QK^T and PV
        + 2 * n * patch * d + 2 * n * d * patch  # input projection and output head
        + 2 * (a.time_freq_dim * d + d * d + 6 * d * d)  # timestep MLP + modulation, one segment
        + 2 * d * 2 * d  # the head's shift/scale
    )
    assert forward_flops(layout, batch=3) == 3 * by_hand
    assert train_flops(layout, batch=3) == 9 * by_hand


def test_a_video_window_counts_the_attention_pairs_inside_it():
    """With a window, attention FLOPs are 4 dim x the attended pairs (counted here pair by pair
    from the hand-built mask), per block; the rest of the count is unchanged."""
    from model.window import VideoWindow
    from tests.test_window import I2V, hand_mask

    a = tiny_args()
    layout = AVTransformer(a).layout(I2V)
    window = VideoWindow(t=2, h=1)
    pairs = int(hand_mask(layout, window).sum())
    n = layout.n_tokens
    assert pairs < n * n
    assert forward_flops(layout, 2) - forward_flops(layout, 2, window=window) == 2 * 4 * a.n_layers * a.dim * (n * n - pairs)


SEQUENCES = {
    "t2v+audio": [TEXT, VIDEO, AUDIO],
    "i2v": [TEXT, Segment("video", "condition", VIDEO.shape), VIDEO],
}


@pytest.mark.parametrize("gate", ["dynamic", "scalar"])
@pytest.mark.parametrize("name", SEQUENCES)
def test_forward_flops_equal_pytorchs_count(name, gate):
    model = AVTransformer(tiny_args(gate=gate))
    inputs, layout, t = make_inputs(model, SEQUENCES[name])
    counter = FlopCounterMode(display=False)
    with attention_backends(("math",)), counter:  # CPU's fused attention is invisible to the counter
        out = model(inputs, layout, t)
    assert counter.get_total_flops() == forward_flops(layout, batch=inputs[0].shape[0])

    counter = FlopCounterMode(display=False)
    with attention_backends(("math",)), counter:
        out = model(inputs, layout, t)
        sum(o.square().sum() for o in out if o is not None).backward()
    # 3x forward, less the input gradient of the first projection (the latents need none)
    measured = counter.get_total_flops()
    assert 0.97 * train_flops(layout, 2) < measured <= train_flops(layout, 2)


def test_model_flops_counts_each_forward_with_its_backward():
    """train/throughput.py's hook: a training forward counts 3x, a forward of a frozen network
    under grad (gradients flow to its input only) 2x, a no-grad forward 1x; off means nothing."""
    from train.throughput import ModelFlops

    holder = torch.nn.ModuleDict({"student": AVTransformer(tiny_args()), "teacher": AVTransformer(tiny_args())})
    holder["teacher"].requires_grad_(False)
    inputs, layout, t = make_inputs(holder["student"], SEQUENCES["t2v+audio"])
    fwd = forward_flops(layout, batch=2)
    counter = ModelFlops(holder)
    holder["student"](inputs, layout, t)
    assert counter.total == 0  # not counting yet
    counter.counting = True
    holder["student"](inputs, layout, t)
    assert counter.total == 3 * fwd
    holder["teacher"](inputs, layout, t)
    assert counter.total == 5 * fwd
    with torch.no_grad():
        holder["student"](inputs, layout, t)
    assert counter.total == 6 * fwd
    from model.window import VideoWindow  # a windowed forward: its attention over the window's pairs

    holder["student"].video_window = VideoWindow(t=1)
    with torch.no_grad():
        holder["student"](inputs, layout, t)
    assert counter.total == 6 * fwd + forward_flops(layout, 2, window=VideoWindow(t=1)) < 7 * fwd
    total = counter.total
    counter.remove()
    holder["student"](inputs, layout, t)
    assert counter.total == total


def test_a_forward_stopped_early_is_counted_as_what_ran():
    """stop_after_block (the distill critic's GAN features): blocks up to it, no output head,
    equal to PyTorch's count, and so counted by the throughput hook."""
    from train.throughput import ModelFlops

    model = AVTransformer(tiny_args())
    inputs, layout, t = make_inputs(model, SEQUENCES["t2v+audio"])
    counter = FlopCounterMode(display=False)
    with attention_backends(("math",)), counter:
        model(inputs, layout, t, stop_after_block=0)
    assert counter.get_total_flops() == forward_flops(layout, batch=2, blocks=1) < forward_flops(layout, batch=2) / 2
    hook = ModelFlops(model)
    hook.counting = True
    with torch.no_grad():
        model(inputs, layout, t, stop_after_block=1)
    assert hook.total == forward_flops(layout, batch=2, blocks=2)
    hook.remove()


def test_mfu_peak_is_dense_on_an_h200(monkeypatch):
    """nvidia-smi's plain "NVIDIA H200" matched nothing in Lightning's table (perf/mfu was empty on
    the lent H200), and its "h200 sxm1" entry is the sparse 2.0e15: our peak is the dense 989.4e12,
    the H100 SXM's; every other GPU keeps Lightning's figure."""
    from train.throughput import peak_flops

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(cuda, torch.bfloat16) == 989.4e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(cuda, torch.bfloat16) == 989.4e12  # Lightning's "h100 sxm"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(cuda, torch.bfloat16) == 756e12
