"""Behaviour of the joint audio-video transformer (model/), on CPU with tiny configs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from model import AVTransformer, ModelArgs, Segment, SequenceLayout, count_parameters, encode_bytes
from model.patch import patchify_audio, patchify_video, unpatchify_audio, unpatchify_video
from model.rope import apply_rope, rope_angles

B = 2


def tiny_args(**overrides) -> ModelArgs:
    base = dict(
        dim=32, n_heads=4, n_kv_heads=2, mlp_hidden=64, n_modality_in=1, n_shared=1, n_modality_out=1,
        video_channels=4, audio_channels=6, audio_patch=2, text_input="bytes", text_feature_dim=0,
        audio_latents_per_video_frame=2.0,
    )
    return ModelArgs(**{**base, **overrides})


def randomized(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """The real init makes every block the identity and every output zero (adaLN-Zero); tests of
    routing and attention need a model whose every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def make_inputs(model: AVTransformer, segments, seed=0, t_generate=0.7):
    g = torch.Generator().manual_seed(seed)
    layout = model.layout(segments)
    inputs = []
    for seg in layout.segments:
        if seg.modality == "text" and model.args.text_input == "bytes":
            inputs.append(torch.randint(0, 256, (B, *seg.shape), generator=g))
        else:
            inputs.append(torch.randn(B, *seg.shape, generator=g))
    per_segment = torch.tensor([[t_generate if s.role == "generate" else 0.0 for s in layout.segments]] * B)
    return inputs, layout, per_segment


TEXT = Segment("text", "condition", (8,))
VIDEO = Segment("video", "generate", (4, 3, 4, 6))
AUDIO = Segment("audio", "generate", (6, 12))
MIXES = {
    "t2v+audio": [TEXT, VIDEO, AUDIO],
    "t2v": [TEXT, VIDEO],
    "t2a": [TEXT, AUDIO],
    "t2i": [TEXT, Segment("image", "generate", (4, 4, 6))],
    "i2v+audio": [TEXT, Segment("video", "condition", (4, 1, 4, 6)), Segment("video", "generate", (4, 2, 4, 6), t_offset=1), AUDIO],
    "r2v": [TEXT, Segment("image", "condition", (4, 4, 4)), VIDEO, AUDIO],
    "sv2v": [TEXT, Segment("image", "condition", (4, 4, 4)), Segment("video", "condition", (4, 3, 4, 6)), VIDEO, AUDIO],
    "unconditional": [VIDEO, AUDIO],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_shapes_for_every_modality_mix(mix):
    model = randomized(AVTransformer(tiny_args()))
    inputs, layout, t = make_inputs(model, MIXES[mix])
    outs = model(inputs, layout, t)
    assert len(outs) == len(inputs)
    for seg, x, y in zip(layout.segments, inputs, outs):
        if seg.role == "generate":
            assert y is not None and y.shape == x.shape and torch.isfinite(y).all()
        else:
            assert y is None


def test_text_features_input():
    model = randomized(AVTransformer(tiny_args(text_input="features", text_feature_dim=10)))
    inputs, layout, t = make_inputs(model, [Segment("text", "condition", (5, 10)), VIDEO, AUDIO])
    outs = model(inputs, layout, t)
    assert outs[1].shape == inputs[1].shape


def test_attention_is_joint_across_modalities():
    model = randomized(AVTransformer(tiny_args()))
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    video = model(inputs, layout, t)[1]
    changed = list(inputs)
    changed[2] = inputs[2].clone()
    changed[2][:, :, 3] += 1.0  # one audio latent frame
    video2 = model(changed, layout, t)[1]
    assert not torch.allclose(video, video2, atol=1e-6)
    # ...and the condition text reaches the video in the same pass too
    changed = list(inputs)
    changed[0] = (inputs[0] + 1) % 256
    assert not torch.allclose(video, model(changed, layout, t)[1], atol=1e-6)


def test_modality_blocks_route_by_modality():
    model = randomized(AVTransformer(tiny_args()))
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO])  # no audio tokens at all
    before = model(inputs, layout, t)[1]
    modality_blocks = [b for b in model.blocks if not b.shared]
    assert len(modality_blocks) == 2
    with torch.no_grad():
        for block in modality_blocks:
            for p in block.weights["audio"].parameters():
                p.add_(torch.randn_like(p))
    assert torch.equal(before, model(inputs, layout, t)[1])
    with torch.no_grad():  # control: the video weights do matter
        for p in modality_blocks[0].weights["video"].parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(before, model(inputs, layout, t)[1], atol=1e-6)


@pytest.mark.parametrize("gate", ["scalar", "dynamic"])
def test_closed_gate_removes_that_heads_contribution(gate):
    args = tiny_args(gate=gate)
    model = randomized(AVTransformer(args))
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    head, hd = 1, args.head_dim
    w = model.blocks[1].weights["shared"]
    logit = w.gate.logit if gate == "scalar" else w.gate.proj.bias
    original = logit[head].item()
    with torch.no_grad():
        logit[head] = -1e4
    closed = model(inputs, layout, t)
    with torch.no_grad():  # reference: gate back open, that head's slice of the output projection removed
        logit[head] = original
        w.out.weight[:, head * hd : (head + 1) * hd] = 0.0
    removed = model(inputs, layout, t)
    with torch.no_grad():  # control: with the gate open that head does contribute
        w.out.weight.normal_()
    opened = model(inputs, layout, t)
    for a, b, c in zip(closed, removed, opened):
        if a is not None:
            torch.testing.assert_close(a, b)
            assert not torch.allclose(a, c, atol=1e-4)


def test_gate_starts_open_halfway_for_every_head():
    for gate in ("scalar", "dynamic"):
        model = AVTransformer(tiny_args(gate=gate))
        h = torch.randn(B, 5, model.args.dim)
        g = model.blocks[0].weights["video"].gate(h)
        assert g.shape == (B, 5, model.args.n_heads, 1)
        torch.testing.assert_close(g, torch.full_like(g, 0.5))


def test_untrained_model_is_identity_with_zero_output():
    """adaLN-Zero init: residual gates are 0, so every block is the identity and velocities are 0."""
    from model.block import BlockContext

    model = AVTransformer(tiny_args())
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    for y in model(inputs, layout, t):
        if y is not None:
            assert torch.count_nonzero(y) == 0
    x = model._embed(inputs, layout)
    _, t_mod = model.time(t.reshape(-1))
    ang = rope_angles(layout.positions, model.args.rope_axes_dim, model.args.rope_theta)
    ctx = BlockContext(layout.runs(False), layout.runs(True), t_mod.unflatten(0, t.shape), ang.cos(), ang.sin(), None)
    for block in model.blocks:
        assert torch.equal(block(x, ctx), x)


def test_audio_and_video_tokens_at_the_same_instant_share_t():
    args = tiny_args(audio_latents_per_video_frame=2.0, audio_patch=2, video_patch=(1, 2, 2))
    layout = SequenceLayout([TEXT, Segment("video", "generate", (4, 3, 4, 6)), Segment("audio", "generate", (6, 12))], args)
    pos = layout.positions
    video = pos[layout.span(1)]
    audio = pos[layout.span(2)]
    # 2 audio latents per video frame and an audio patch of 2: audio token n starts at frame n
    assert torch.equal(audio[:, 0], torch.arange(6, dtype=torch.float32))
    for frame in range(3):
        assert (video[video[:, 0] == frame]).shape[0] == 2 * 3
    assert set(video[:, 0].tolist()) <= set(audio[:, 0].tolist())
    # fractional when the rates do not divide: 3 audio tokens per video frame
    args3 = tiny_args(audio_latents_per_video_frame=3.0, audio_patch=1)
    a3 = SequenceLayout([Segment("audio", "generate", (6, 9))], args3).positions[:, 0]
    torch.testing.assert_close(a3, torch.arange(9) / 3.0)


def test_text_and_image_positions_never_collide_with_video():
    args = tiny_args()
    segs = [TEXT, Segment("image", "condition", (4, 4, 6)), Segment("image", "condition", (4, 4, 6)),
            Segment("video", "condition", (4, 1, 4, 6)), Segment("video", "generate", (4, 2, 4, 6), t_offset=1), AUDIO]
    layout = SequenceLayout(segs, args)
    pos = layout.positions
    assert pos.shape == (layout.n_tokens, 3)
    video = {tuple(p) for i in (3, 4) for p in pos[layout.span(i)].tolist()}
    others = {tuple(p) for i in (0, 1, 2) for p in pos[layout.span(i)].tolist()}
    assert not video & others
    assert len(others) == sum(layout.lengths[:3])  # text and the two images do not collide either
    # I2V: the generated frames continue the condition frame's time axis
    assert pos[layout.span(3)][:, 0].unique().tolist() == [0.0]
    assert pos[layout.span(4)][:, 0].unique().tolist() == [1.0, 2.0]


def test_rope_is_relative_on_every_axis():
    """q.k after rotation depends only on the position difference, also for fractional positions."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 12), torch.randn(1, 1, 1, 12)

    def score(pq, pk):
        pos = torch.tensor([pq, pk], dtype=torch.float32)
        ang = rope_angles(pos, (4, 4, 4), 100.0)
        rq = apply_rope(q, ang.cos()[:1], ang.sin()[:1])
        rk = apply_rope(k, ang.cos()[1:], ang.sin()[1:])
        return (rq * rk).sum()

    base = score([0.5, 1, 2], [2.0, 3, 1])
    torch.testing.assert_close(score([3.5, 5, 7], [5.0, 7, 6]), base)
    assert not torch.allclose(score([0.5, 1, 2], [2.5, 3, 1]), base)


def test_condition_segments_are_read_but_not_predicted():
    model = randomized(AVTransformer(tiny_args()))
    segs = MIXES["i2v+audio"]
    inputs, layout, t = make_inputs(model, segs)
    assert t[:, layout.span(1)].eq(0).all()  # clean condition frame at t = 0
    outs = model(inputs, layout, t)
    assert outs[0] is None and outs[1] is None
    assert outs[2] is not None and outs[3] is not None
    changed = list(inputs)
    changed[1] = inputs[1] + 1.0
    assert not torch.allclose(outs[2], model(changed, layout, t)[2], atol=1e-6)


def test_timestep_changes_the_prediction_per_segment():
    model = randomized(AVTransformer(tiny_args()))
    inputs, layout, _ = make_inputs(model, [TEXT, VIDEO, AUDIO])
    t1 = torch.tensor([[0.0, 0.3, 0.3]] * B)
    t2 = torch.tensor([[0.0, 0.3, 0.9]] * B)
    o1, o2 = model(inputs, layout, t1), model(inputs, layout, t2)
    assert not torch.allclose(o1[2], o2[2], atol=1e-6)


def test_key_mask_hides_padding_tokens():
    model = randomized(AVTransformer(tiny_args()))
    ids, mask = encode_bytes(["red ball", "blue cube"], 16)
    segs = [Segment("text", "condition", (16,)), VIDEO]
    inputs, layout, t = make_inputs(model, segs)
    inputs[0] = ids
    key_mask = torch.cat([mask, torch.ones(B, layout.n_tokens - 16, dtype=torch.bool)], dim=1)
    out = model(inputs, layout, t, key_mask=key_mask)[1]
    garbage = ids.clone()
    garbage[~mask] = 7  # change only the padding
    inputs2 = [garbage, inputs[1]]
    torch.testing.assert_close(model(inputs2, layout, t, key_mask=key_mask)[1], out)


def test_block_matches_a_plain_reference():
    """One shared block on a single segment against attention written out by hand."""
    args = tiny_args(n_modality_in=0, n_shared=1, n_modality_out=0, gate="scalar")
    model = randomized(AVTransformer(args), std=0.3)
    seg = Segment("video", "generate", (4, 2, 2, 4))
    inputs, layout, t = make_inputs(model, [seg])
    x = model._embed(inputs, layout)
    from model.block import BlockContext

    _, t_mod = model.time(t[:1, :1].reshape(-1)[:1])
    ang = rope_angles(layout.positions, args.rope_axes_dim, args.rope_theta)
    ctx = BlockContext(layout.runs(False), layout.runs(True), t_mod[None].expand(B, 1, 6, args.dim), ang.cos(), ang.sin(), None)
    got = model.blocks[0](x, ctx)

    w = model.blocks[0].weights["shared"]
    m = t_mod[0] + w.modulation
    H, KV, hd = args.n_heads, args.n_kv_heads, args.head_dim

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + args.norm_eps) * weight

    h = rms(x, w.attn_norm.weight) * (1 + m[1]) + m[0]
    qkv = h @ w.qkv.weight.T
    q, k, v = qkv[..., : H * hd], qkv[..., H * hd : (H + KV) * hd], qkv[..., (H + KV) * hd :]
    q = rms(q.unflatten(-1, (H, hd)), w.q_norm.weight)
    k = rms(k.unflatten(-1, (KV, hd)), w.k_norm.weight)
    v = v.unflatten(-1, (KV, hd))
    q, k = apply_rope(q, ang.cos(), ang.sin()), apply_rope(k, ang.cos(), ang.sin())
    k = k.repeat_interleave(H // KV, dim=2)
    v = v.repeat_interleave(H // KV, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    o = o * torch.sigmoid(w.gate.logit)[None, None, :, None]
    x1 = x + m[2] * (o.flatten(2) @ w.out.weight.T)
    h2 = rms(x1, w.mlp_norm.weight) * (1 + m[4]) + m[3]
    g, u = (h2 @ w.w_gate_up.weight.T).chunk(2, -1)
    want = x1 + m[5] * ((F.silu(g) * u) @ w.w_down.weight.T)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_patchify_round_trips():
    v = torch.randn(2, 3, 4, 6, 8)
    tok = patchify_video(v, (2, 2, 2))
    assert tok.shape == (2, 2 * 3 * 4, 3 * 8)
    torch.testing.assert_close(unpatchify_video(tok, (2, 3, 4), (2, 2, 2)), v)
    a = torch.randn(2, 5, 12)
    assert patchify_audio(a, 3).shape == (2, 4, 15)
    torch.testing.assert_close(unpatchify_audio(patchify_audio(a, 3), 3), a)


def test_bf16_forward_matches_fp32():
    model = randomized(AVTransformer(tiny_args()), std=0.1)
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO, AUDIO])
    ref = model(inputs, layout, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(inputs, layout, t)
    for r, lo in zip(ref, low):
        if r is not None:
            assert lo.dtype == torch.bfloat16
            err = (lo.float() - r).norm() / r.norm()
            assert err < 3e-2, f"relative error {err:.3g} beyond bf16 tolerance"


def test_hh15b_preset_on_meta_device():
    cfg = OmegaConf.load("conf/model/hh15b.yaml")
    with torch.device("meta"):
        model = instantiate(cfg)
    n = count_parameters(model)
    assert 14.5e9 <= n <= 15.5e9, n
    a = model.args
    assert (a.n_modality_in, a.n_shared, a.n_modality_out, a.n_layers) == (4, 32, 4, 40)
    assert a.head_dim == 128 and a.n_kv_heads == 8
    assert [b.shared for b in model.blocks] == [False] * 4 + [True] * 32 + [False] * 4
    assert set(model.blocks[0].weights) == {"text", "image", "video", "audio"}
    assert next(model.parameters()).device.type == "meta"


def test_tiny_preset_builds_and_runs():
    # the latent interface is left null in the preset and filled from the codec by train/
    cfg = OmegaConf.load("conf/model/tiny.yaml")
    assert cfg.video_channels is None and cfg.audio_channels is None
    model = instantiate(cfg, video_channels=48, audio_channels=160, audio_latents_per_video_frame=4.0)
    a = model.args
    segs = [Segment("text", "condition", (16,)), Segment("video", "generate", (a.video_channels, 2, 8, 8)),
            Segment("audio", "generate", (a.audio_channels, 4))]
    layout = model.layout(segs)
    inputs = [torch.randint(0, 256, (1, 16)), torch.randn(1, a.video_channels, 2, 8, 8), torch.randn(1, a.audio_channels, 4)]
    outs = model(inputs, layout, torch.tensor([[0.0, 0.5, 0.5]]))
    loss = (outs[1] - 1).square().mean() + (outs[2] - 1).square().mean()
    loss.backward()
    for m in ("video", "audio"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads[m].proj.parameters())


# ---- bad input: ValueError naming the field and value ----------------------------------------


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"n_heads=5.*dim=32"):
        tiny_args(n_heads=5)
    with pytest.raises(ValueError, match=r"n_kv_heads=3"):
        tiny_args(n_kv_heads=3)
    with pytest.raises(ValueError, match=r"gate='sometimes'"):
        tiny_args(gate="sometimes")


def test_unknown_modality_and_role():
    args = tiny_args()
    with pytest.raises(ValueError, match=r"segment 1: modality='vidio'"):
        SequenceLayout([TEXT, Segment("vidio", "generate", (4, 1, 2, 2))], args)
    with pytest.raises(ValueError, match=r"segment 0: role='noise'"):
        SequenceLayout([Segment("video", "noise", (4, 1, 2, 2))], args)
    with pytest.raises(ValueError, match=r"text can only be a 'condition'"):
        SequenceLayout([Segment("text", "generate", (4,))], args)


def test_segment_shapes_are_checked():
    args = tiny_args()
    with pytest.raises(ValueError, match=r"segment 0 \(video\).*W=5, not divisible by the patch size 2"):
        SequenceLayout([Segment("video", "generate", (4, 1, 2, 5))], args)
    with pytest.raises(ValueError, match=r"has 3 channels but ModelArgs.video_channels=4"):
        SequenceLayout([Segment("video", "generate", (3, 1, 2, 2))], args)
    with pytest.raises(ValueError, match=r"segment 0 \(audio\): shape=\(6,\) must be \(C, T\)"):
        SequenceLayout([Segment("audio", "generate", (6,))], args)


def test_mismatched_inputs_and_uncovered_sequence():
    model = AVTransformer(tiny_args())
    inputs, layout, t = make_inputs(model, [TEXT, VIDEO])
    with pytest.raises(ValueError, match=r"inputs\[1\] \(video/generate\): shape"):
        model([inputs[0], inputs[1][:, :, :2]], layout, t)
    with pytest.raises(ValueError, match=r"got 1 tensors for a layout of 2 segments"):
        model(inputs[:1], layout, t)
    with pytest.raises(ValueError, match=r"timesteps: shape \(2, 1\) != \(batch, segments\) = \(2, 2\)"):
        model(inputs, layout, t[:, :-1])
    with pytest.raises(ValueError, match=r"one timestep per segment"):
        model(inputs, layout, layout.expand(t))
    with pytest.raises(ValueError, match=r"key_mask: shape"):
        model(inputs, layout, t, key_mask=torch.ones(B, 3, dtype=torch.bool))
