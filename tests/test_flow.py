"""Flow-matching math, the sampler and guidance, against hand-computed references."""

import pytest
import torch

from model import AVTransformer, ModelArgs
from train.codec import PatchCodec
from train.flow import (
    add_noise,
    cfg_combine,
    euler_sample,
    per_sample_mse,
    sample_timesteps,
    sampling_schedule,
    shift_for_tokens,
    time_shift,
    velocity_target,
    weighted_loss,
)
from train.sampling import ClipSpec, Guidance, generate, latent_noise, make_velocity_fn, seed_generators
from train.sequence import build_sequence, segment_timesteps


def test_interpolation_and_target_by_hand():
    x0 = torch.tensor([[1.0, -2.0]])
    eps = torch.tensor([[3.0, 0.5]])
    t = torch.tensor([0.25])
    # x_t = 0.75 * x0 + 0.25 * eps
    torch.testing.assert_close(add_noise(x0, eps, t), torch.tensor([[1.5, -1.375]]))
    torch.testing.assert_close(velocity_target(x0, eps), torch.tensor([[2.0, 2.5]]))
    # t = 0 is data, t = 1 is noise
    torch.testing.assert_close(add_noise(x0, eps, torch.tensor([0.0])), x0)
    torch.testing.assert_close(add_noise(x0, eps, torch.tensor([1.0])), eps)
    # moving along the target velocity from x_t by (1 - t) reaches the noise
    torch.testing.assert_close(add_noise(x0, eps, t) + 0.75 * velocity_target(x0, eps), eps)


def test_time_shift_by_hand():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(time_shift(t, 1.0), t)
    # shift 3: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    torch.testing.assert_close(time_shift(t, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    assert (time_shift(torch.rand(100), 4.0) >= 0).all()


def test_shift_grows_with_token_count():
    assert shift_for_tokens(1024, 1024, 1.5, 6.0) == pytest.approx(1.5)
    assert shift_for_tokens(4096, 1024, 1.5, 6.0) == pytest.approx(3.0)  # sqrt(4) * 1.5
    assert shift_for_tokens(10**6, 1024, 1.5, 6.0) == 6.0  # capped


def test_logit_normal_timesteps_follow_their_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, 1.0, 0.0, 1.0, g)
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1.0) < 0.03
    shifted = sample_timesteps(20000, 3.0, 0.0, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, time_shift(t, 3.0))
    assert shifted.median() > t.median()


def test_sampling_schedule_is_the_shifted_uniform_grid():
    s = sampling_schedule(4, 3.0)
    uniform = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(s, 3 * uniform / (1 + 2 * uniform))
    # DESIGN.md: shift 5 turns 8 uniform steps into 1000, 972, 938, 893, 833, 750, 625, 417
    s8 = (sampling_schedule(8, 5.0)[:-1] * 1000).round().tolist()
    assert s8 == [1000, 972, 938, 893, 833, 750, 625, 417]


def test_euler_sampler_integrates_a_known_flow_exactly():
    """For data at a single point x0, the exact velocity is (x - x0) / t; Euler on it is exact."""
    x0 = torch.tensor([[2.0, -1.0]])

    def velocity(xs, t):
        return [(xs[0] - x0) / t]

    noise = [torch.tensor([[0.3, 0.7]])]
    out = euler_sample(velocity, noise, sampling_schedule(5, 2.0))
    torch.testing.assert_close(out[0], x0)


def test_cfg_standard_form():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert cfg_combine(cond, uncond, 1.0).item() == 2.0
    assert cfg_combine(cond, uncond, 0.0).item() == 1.0
    assert cfg_combine(cond, uncond, 5.0).item() == 6.0  # 1 + 5 * (2 - 1), not 2 + 5 * (2 - 1)


def test_joint_loss_weights_modalities_after_averaging_each():
    video = torch.tensor([1.0, 3.0])
    audio = torch.tensor([10.0])
    assert weighted_loss({"video": video, "audio": audio}, {"video": 1.0, "audio": 0.5}).item() == 2.0 + 5.0
    assert per_sample_mse(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_heads=4, n_kv_heads=2, mlp_hidden=64, n_modality_in=1, n_shared=1, n_modality_out=1,
                     video_channels=48, audio_channels=160, text_input="bytes", text_feature_dim=0, audio_latents_per_video_frame=50 / 12)
    model = AVTransformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_cfg_scale_one_equals_the_conditional_prediction():
    model, codec = tiny_model(), PatchCodec()
    spec = ClipSpec.from_seconds(0.5, 12, 16, 16, 8000)
    xs = latent_noise(codec, spec, seed_generators([3]), "cpu")
    guided = make_velocity_fn(model, ["a red ball"], 16, Guidance(1.0, 1.0))(xs, 0.6)
    seq = build_sequence(model.args, ["a red ball"], 16, xs[0], xs[1])
    cond = model(seq.inputs, seq.layout, segment_timesteps(seq, torch.tensor([0.6])), seq.key_mask)
    torch.testing.assert_close(guided[0], cond[1])
    torch.testing.assert_close(guided[1], cond[2])
    # and a scale of 3 is uncond + 3 (cond - uncond), per modality
    g3 = make_velocity_fn(model, ["a red ball"], 16, Guidance(3.0, 2.0))(xs, 0.6)
    useq = build_sequence(model.args, [""], 16, xs[0], xs[1])
    uncond = model(useq.inputs, useq.layout, segment_timesteps(useq, torch.tensor([0.6])), useq.key_mask)
    torch.testing.assert_close(g3[0], uncond[1] + 3.0 * (cond[1] - uncond[1]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g3[1], uncond[2] + 2.0 * (cond[2] - uncond[2]), rtol=1e-4, atol=1e-5)


def test_same_seed_same_noise_different_seed_different_noise():
    codec = PatchCodec()
    spec = ClipSpec.from_seconds(0.5, 12, 16, 16, 8000)
    a, b, c = (latent_noise(codec, spec, seed_generators([s]), "cpu") for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (1, 48, 6, 4, 4) and a[1].shape == (1, 160, 25)


def test_patch_codec_round_trips():
    codec = PatchCodec(video_spatial=2, video_temporal=2, audio_hop=4, audio_scale=3.0)
    video = torch.rand(2, 3, 4, 8, 6) * 2 - 1
    audio = torch.rand(2, 1, 16) * 2 - 1
    assert codec.encode_video(video).shape == (2, 24, 2, 4, 3)
    torch.testing.assert_close(codec.decode_video(codec.encode_video(video)), video)
    torch.testing.assert_close(codec.decode_audio(codec.encode_audio(audio)), audio)
    assert codec.audio_latents_per_video_frame(fps=24, sample_rate=16) == pytest.approx(4 / 12)
    with pytest.raises(ValueError, match="video width=6 is not divisible by 4"):
        PatchCodec(video_spatial=4).encode_video(torch.zeros(1, 3, 1, 8, 6))


def test_sequence_tasks_and_timesteps():
    model = tiny_model()
    video, audio = torch.randn(2, 48, 4, 4, 4), torch.randn(2, 160, 8)
    seq = build_sequence(model.args, ["a", "b"], 8, video, audio, task="i2v")
    roles = [(s.modality, s.role) for s in seq.layout.segments]
    assert roles == [("text", "condition"), ("video", "condition"), ("video", "generate"), ("audio", "generate")]
    t = segment_timesteps(seq, torch.tensor([0.3, 0.9]))
    assert t[:, seq.layout.span(1)].eq(0).all() and t[0, seq.layout.span(2)].eq(0.3).all()
    # "a" is BOS a EOS, left-padded to 8: padding first, then the caption, then every other token
    assert seq.key_mask is not None and not seq.key_mask[:, :5].any() and seq.key_mask[:, 5:].all()
    assert seq.targets == {2: "video", 3: "audio"}
    with pytest.raises(ValueError, match="task='v2a'"):
        build_sequence(model.args, ["a"], 8, video[:1], None, task="v2a")


def test_trimmed_captions_give_the_same_velocities_without_a_mask():
    """Left padding keeps a caption's tokens where they are whatever the padded length, so the
    sampler can cut the text to the captions' own length: the same velocities, and at batch 1 no
    key mask at all (cuDNN attention's fast path)."""
    model = tiny_model()
    video, audio = torch.randn(2, 48, 4, 4, 4), torch.randn(2, 160, 8)
    t = torch.tensor([0.3, 0.8])
    for captions in (["a red ball"], ["a red ball", "hum"]):
        b = len(captions)
        padded = build_sequence(model.args, captions, 32, video[:b], audio[:b])
        trimmed = build_sequence(model.args, captions, 32, video[:b], audio[:b], trim_text=True)
        assert padded.layout.segments[0].shape == (32,) and trimmed.layout.segments[0].shape == (12,)  # BOS + 10 bytes + EOS
        assert (trimmed.key_mask is None) == (b == 1) and padded.key_mask is not None
        want = model(padded.inputs, padded.layout, segment_timesteps(padded, t[:b]), padded.key_mask)
        got = model(trimmed.inputs, trimmed.layout, segment_timesteps(trimmed, t[:b]), trimmed.key_mask)
        for i in padded.targets:
            torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-6)
    # a caption longer than text_len is still cut to text_len
    assert build_sequence(model.args, ["x" * 100], 32, video[:1], audio[:1], trim_text=True).layout.segments[0].shape == (32,)


def test_guided_sampler_runs_cond_and_uncond_apart_without_masks():
    model = tiny_model()
    codec = PatchCodec()
    spec = ClipSpec.from_seconds(0.5, 12, 16, 16, 8000)
    xs = latent_noise(codec, spec, seed_generators([3]), "cpu")
    masks = []
    hook = model.register_forward_pre_hook(lambda m, args: masks.append(args[3]))
    batched = make_velocity_fn(model, ["a red ball"], 16, Guidance(3.0, 2.0))(xs, 0.6)
    assert len(masks) == 1 and masks[0] is not None  # cond + uncond in one batch: the empty caption is padded
    masks.clear()
    apart = make_velocity_fn(model, ["a red ball"], 16, Guidance(3.0, 2.0), trim_text=True)(xs, 0.6)
    assert masks == [None, None]
    masks.clear()
    generate(model, codec, ["a red ball"], [0], spec, 2, Guidance(3.0, 2.0), 16)  # what `train sample` runs
    assert len(masks) == 4 and all(m is None for m in masks)
    hook.remove()
    for a, b in zip(apart, batched):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_right_padded_models_of_older_files_keep_their_padding():
    """A checkpoint written before ModelArgs.text_padding existed was trained on right-padded
    captions: it loads as such, and trimming (exact only on the left) leaves its text alone."""
    from dataclasses import asdict

    from train.checkpoint import model_args

    meta = {"model": {k: v for k, v in asdict(tiny_model().args).items() if k != "text_padding"}}
    old = model_args(meta)
    assert old.text_padding == "right"
    seq = build_sequence(old, ["ab"], 8, torch.randn(1, 48, 4, 4, 4), None, trim_text=True)
    assert seq.inputs[0][0, :4].tolist() == [257, 97, 98, 258] and seq.key_mask[0, :8].tolist() == [True] * 4 + [False] * 4
    assert model_args({"model": asdict(tiny_model().args)}).text_padding == "left"


def test_generate_runs_a_model_held_in_bf16():
    """DeepSpeed's bf16 keeps the module itself in bf16 (no autocast): the end-of-run samples once
    crashed there on float32 latents. The sampler runs such a model under bf16 autocast, keeps its
    latents in float32, and gives about what the float32 model gives."""
    model, codec = tiny_model(), PatchCodec()
    spec = ClipSpec.from_seconds(0.5, 12, 16, 16, 8000)
    want = generate(model, codec, ["a red ball"], [0], spec, 2, Guidance(3.0, 2.0), 16)
    got = generate(model.to(torch.bfloat16), codec, ["a red ball"], [0], spec, 2, Guidance(3.0, 2.0), 16)
    other = generate(model.float(), codec, ["a red ball"], [1], spec, 2, Guidance(3.0, 2.0), 16)  # another seed: another clip
    for g, w, o in zip(got, want, other):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert (g - w).abs().max().item() < 0.1 < (o - w).abs().max().item()  # bf16 rounding, not another clip


def test_student_sampler_renoises_with_fresh_noise_per_clip(monkeypatch):
    """The distilled student's sampler re-noises each x0 with noise independent of the clip's
    starting noise (as backward simulation trains it) and drawn from the clip's own seed, so a
    clip does not change with the clips batched next to it."""
    import train.dmd

    model, codec = tiny_model(), PatchCodec()
    spec = ClipSpec.from_seconds(0.5, 12, 16, 16, 8000)
    student = {"steps": 3, "timesteps": None}
    draws = []
    randn_like = train.dmd._randn_like
    monkeypatch.setattr(train.dmd, "_randn_like", lambda x, g: draws.append(randn_like(x, g)) or draws[-1])
    alone = generate(model, codec, ["a red ball"], [7], spec, 3, Guidance(1.0, 1.0), 16, shift=3.0, student=student)
    start = latent_noise(codec, spec, seed_generators([7]), "cpu")
    assert len(draws) == 2 * 2  # two re-noisings (3 steps), video and audio each
    for drawn, first in zip(draws[:2], start):
        assert drawn.shape == first.shape and not torch.allclose(drawn, first)
    batched = generate(model, codec, ["a red ball"] * 2, [5, 7], spec, 3, Guidance(1.0, 1.0), 16, shift=3.0, student=student)
    for one, two in zip(alone, batched):
        torch.testing.assert_close(two[1:], one, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        train.dmd._randn_like(torch.zeros(3, 2), seed_generators([1, 2]))
