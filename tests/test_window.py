"""Windowed attention between video tokens (model/window.py): the mask against a hand-built one,
the model's forward against dense attention, and what a window hides."""

import pytest
import torch
import torch.nn.functional as F

from model import AVTransformer, Segment
from model.block import BlockContext, windowed_attention
from model.transformer import rope_tables
from model.window import VideoWindow, computed_fraction, video_pairs_kept, window_block_mask, window_dense_mask
from tests.test_model import make_inputs, randomized, tiny_args

TEXT = Segment("text", "condition", (8,))
AUDIO = Segment("audio", "generate", (6, 40))
# 24 latent frames of 4 x 4 tokens (the demo's 2 s clips at 12 fps): 384 video tokens, 3 tiles.
VIDEO = Segment("video", "generate", (4, 24, 8, 8))
# 48 frames: 768 video tokens, 6 tiles of 128, so a narrow window skips whole tiles (each tile
# holding text or audio is needed by every query).
LONG = Segment("video", "generate", (4, 48, 8, 8))
# I2V: a conditioning frame at t=0 and generated frames from t=1, in two segments.
I2V = [TEXT, Segment("video", "condition", (4, 1, 8, 8)), Segment("video", "generate", (4, 47, 8, 8), t_offset=1), AUDIO]


def hand_mask(layout, window: VideoWindow) -> torch.Tensor:
    """(N, N) True = attend, written pair by pair from the layout's positions."""
    pos = layout.positions.tolist()
    video = [s.modality == "video" for s, n in zip(layout.segments, layout.lengths) for _ in range(n)]
    halves = (window.t, window.h, window.w)
    n = layout.n_tokens
    mask = torch.ones(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if video[q] and video[k]:
                mask[q, k] = all(h is None or abs(pos[q][i] - pos[k][i]) <= h for i, h in enumerate(halves))
    return mask


def tiles_with_pairs(mask: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """(N, N) pair mask -> (tiles, tiles): True where a tile holds at least one attended pair."""
    n = mask.shape[-1]
    t = -(-n // tile)
    padded = torch.zeros(t * tile, t * tile, dtype=torch.bool)
    padded[:n, :n] = mask
    return padded.view(t, tile, t, tile).any(dim=3).any(dim=1)


def random_qkv(args, n: int, seed: int):
    """Queries (2, heads, n, head_dim) and grouped keys and values (2, kv_heads, n, head_dim)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, args.n_heads, n, args.head_dim, generator=g)
    k, v = (torch.randn(2, args.n_kv_heads, n, args.head_dim, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("segments,window", [([TEXT, LONG, AUDIO], VideoWindow(t=2)), (I2V, VideoWindow(t=1, h=1)), ([TEXT, LONG], VideoWindow(t=0, h=0, w=0))])
def test_windowed_attention_equals_sdpa_with_the_hand_built_mask(segments, window):
    args = tiny_args()
    layout = AVTransformer(args).layout(segments)
    q, k, v = random_qkv(args, layout.n_tokens, seed=0)
    cpu = torch.device("cpu")
    block_mask = window_block_mask(layout, window, cpu)
    mask = hand_mask(layout, window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # FlexAttention (eager on CPU: the mask_mod over every pair) and the dense mask (the CPU's path)
    torch.testing.assert_close(windowed_attention(q, k, v, block_mask, gqa=True), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(window_dense_mask(layout, window, cpu)[0, 0], mask)
    # The block mask's tiles (what the GPU kernel computes) are exactly those holding an attended pair.
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), tiles_with_pairs(mask))
    assert computed_fraction(block_mask) < 1.0
    video = torch.tensor([s.modality == "video" for s, n in zip(layout.segments, layout.lengths) for _ in range(n)])
    pairs = mask[video][:, video]
    assert video_pairs_kept(layout, window) == pytest.approx(pairs.float().mean().item())


def test_a_window_over_every_frame_is_dense_attention():
    model = randomized(AVTransformer(tiny_args())).eval()
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    with torch.no_grad():
        dense = model(inputs, layout, t)
        model.video_window = VideoWindow(t=23)
        windowed = model(inputs, layout, t)
        model.video_window = VideoWindow(t=2)
        narrow = model(inputs, layout, t)
    for d, w in zip(dense[1:], windowed[1:]):
        torch.testing.assert_close(w, d, atol=1e-5, rtol=1e-4)
    assert (narrow[1] - dense[1]).abs().max() > 1e-3


def test_video_outside_the_window_does_not_reach_a_token_in_one_layer():
    """One block, window of +-1 frame: a change of frame 0 reaches frames 0-1 and the audio, and
    leaves frames 2+ exactly as they were; with dense attention it reaches every frame."""
    model = randomized(AVTransformer(tiny_args(n_modality_in=1, n_shared=0, n_modality_out=0))).eval()
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    changed = [x.clone() for x in inputs]
    changed[1][:, :, 0] += 1.0

    def video_and_audio(window):
        model.video_window = window
        with torch.no_grad():
            return [model(x, layout, t) for x in (inputs, changed)]

    (before, after) = video_and_audio(VideoWindow(t=1))
    assert (after[1][:, :, :2] - before[1][:, :, :2]).abs().max() > 1e-3
    torch.testing.assert_close(after[1][:, :, 2:], before[1][:, :, 2:], atol=0, rtol=0)
    assert (after[2] - before[2]).abs().max() > 1e-3  # audio attends to every frame
    (before, after) = video_and_audio(None)
    assert (after[1][:, :, 2:] - before[1][:, :, 2:]).abs().max() > 1e-3


def test_key_mask_goes_into_both_masks_per_sample():
    """With a key mask the masks get a batch dimension: per sample, the window and that sample's
    padding; the block mask's tiles follow, and FlexAttention equals SDPA with the dense mask."""
    args = tiny_args()
    layout = AVTransformer(args).layout([TEXT, LONG, AUDIO])
    window, cpu, n = VideoWindow(t=1), torch.device("cpu"), layout.n_tokens
    key_mask = torch.ones(2, n, dtype=torch.bool)
    key_mask[1, 3:8] = False
    dense = window_dense_mask(layout, window, cpu, key_mask)
    want = hand_mask(layout, window)
    assert dense.shape == (2, 1, n, n) and torch.equal(dense[0, 0], want) and torch.equal(dense[1, 0], want & key_mask[1])
    block_mask = window_block_mask(layout, window, cpu, key_mask)
    for b in range(2):
        assert torch.equal(block_mask.to_dense()[b, 0].bool(), tiles_with_pairs(dense[b, 0]))
    q, k, v = random_qkv(args, n, seed=3)
    torch.testing.assert_close(windowed_attention(q, k, v, block_mask, gqa=True),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True), atol=1e-5, rtol=1e-5)


def test_key_mask_stays_hidden_under_a_window():
    """Padding hidden by the key mask stays hidden under a window: changing it changes nothing."""
    model = randomized(AVTransformer(tiny_args())).eval()
    model.video_window = VideoWindow(t=1)
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    key_mask = torch.ones(2, layout.n_tokens, dtype=torch.bool)
    key_mask[1, 5:8] = False  # the second sample's caption is 5 bytes, padded to 8
    other = [x.clone() for x in inputs]
    other[0][1, 5:8] = (other[0][1, 5:8] + 7) % 256
    with torch.no_grad():
        a, b = model(inputs, layout, t, key_mask), model(other, layout, t, key_mask)
        unmasked = model(other, layout, t)
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    assert (unmasked[1][1] - a[1][1]).abs().max() > 1e-4


def test_compiled_flex_block_equals_the_dense_mask_block():
    """The GPU's path (a block compiled with FlexAttention over the block mask, fullgraph) against
    the CPU's (the same block eager, SDPA with the dense mask)."""
    args = tiny_args()
    model = randomized(AVTransformer(args)).eval()
    block = model.blocks[1]  # a shared block
    layout = model.layout([TEXT, LONG, AUDIO])
    window, cpu = VideoWindow(t=2), torch.device("cpu")
    x = torch.randn(1, layout.n_tokens, args.dim, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(layout, cpu)
    modulation = 0.1 * torch.randn(1, len(layout.segments), 6, args.dim, generator=torch.Generator().manual_seed(2))

    def ctx(**masks):
        return BlockContext(layout.runs(False), layout.runs(True), modulation, cos, sin, **masks)

    with torch.no_grad():
        dense = block(x, ctx(attn_mask=window_dense_mask(layout, window, cpu)))
        torch._dynamo.reset()
        compiled = torch.compile(block.forward, fullgraph=True, dynamic=False)(x, ctx(attn_mask=None, block_mask=window_block_mask(layout, window, cpu)))
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, dense, atol=1e-4, rtol=1e-4)


def test_window_trains_on_cpu_and_its_gradient_respects_the_window():
    """One block, +-1 frame: the gradient of a late frame's output reaches frames 1-3 of the input
    and nothing of frame 0."""
    model = randomized(AVTransformer(tiny_args(n_modality_in=1, n_shared=0, n_modality_out=0)))
    model.video_window = VideoWindow(t=1)
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    video = inputs[1].requires_grad_(True)
    out = model(inputs, layout, t)
    out[1][:, :, 2].square().sum().backward()
    grad = video.grad.abs().sum(dim=(0, 1, 3, 4))  # per frame
    assert grad[0] == 0 and (grad[1:4] > 0).all() and (grad[4:] == 0).all()
    assert model.blocks[0].weights["video"].qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [dict(t=-1), dict(t=1.5), dict(t=True), dict()])
def test_bad_windows_are_refused(bad):
    with pytest.raises(ValueError, match="VideoWindow"):
        VideoWindow(**bad)


@pytest.mark.parametrize("spec,want", [(None, None), ("none", None), ("3", VideoWindow(3)), (3, VideoWindow(3)), ("3,all,5", VideoWindow(3, None, 5)),
                                       ([2, None], VideoWindow(2, None)), ([0, 1, 2], VideoWindow(0, 1, 2))])
def test_window_parse(spec, want):
    assert VideoWindow.parse(spec) == want


@pytest.mark.parametrize("spec", ["3,4,5,6", "x", [], "-1", "all"])
def test_window_parse_refuses(spec):
    with pytest.raises(ValueError, match="VideoWindow"):
        VideoWindow.parse(spec)


def test_selective_checkpointing_keeps_flex_attention():
    from torch.utils.checkpoint import CheckpointPolicy

    from train.parallelize import _selective_policy

    assert _selective_policy(None, torch.ops.higher_order.flex_attention) == CheckpointPolicy.MUST_SAVE


def test_distill_config_names_a_bad_student_window():
    from train.config import ConfigError, DistillConfig

    assert DistillConfig(student_video_window=[2]).student_window == VideoWindow(t=2)
    assert DistillConfig(student_video_window=[2]).student_video_window == [2, None, None]  # as the export stores it
    assert DistillConfig().student_window is None
    with pytest.raises(ConfigError, match=r"distill.student_video_window=\[1, 2, 3, 4\]: VideoWindow .* one to three"):
        DistillConfig(student_video_window=[1, 2, 3, 4])
