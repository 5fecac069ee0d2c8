"""DMD-2 math (train/dmd.py) against hand-computed references."""

import math

import pytest
import torch
from torch import nn

from train.dmd import (
    GANHead,
    backward_simulate,
    critic_loss,
    dm_generator_loss,
    dm_timesteps,
    gan_accuracy,
    gan_discriminator_loss,
    gan_generator_loss,
    generator_steps_before,
    is_generator_step,
    noise_like,
    random_exit_index,
    student_generate_at,
    student_sample,
)
from train.flow import add_noise, sampling_schedule, time_shift, time_unshift


def constant_velocity(values, seen=None):
    """A 'network' that returns fixed velocities and records what it was called with."""

    def velocity(xs, t):
        if seen is not None:
            seen.append(([x.clone() for x in xs], t.clone()))
        return [v.clone() for v in values]

    return velocity


# --- distribution-matching loss ----------------------------------------------------------------
#
# With constant velocities c_real, c_fake: x0_real = x_t - t c_real, x0_fake = x_t - t c_fake, so
#   x0_fake - x0_real = t (c_real - c_fake)
#   x - x0_real       = t (x - eps + c_real)        (x_t = (1 - t) x + t eps)
# and the normalised gradient is (c_real - c_fake) / mean|x - eps + c_real| per sample: t cancels.
# The loss 0.5 * mean((x - sg(x - grad))^2) has d/dx = grad / numel.

X_VIDEO = [[1.0, 3.0], [4.0, -2.0]]
EPS_VIDEO = [[0.0, 0.0], [0.0, 0.0]]
REAL_VIDEO = [[1.0, -1.0], [0.0, 0.0]]
FAKE_VIDEO = [[0.0, 1.0], [2.0, 0.0]]
# sample 0: x - eps + c_real = [2, 2] -> norm 2, c_real - c_fake = [1, -2] -> grad [0.5, -1]
# sample 1: x - eps + c_real = [4, -2] -> norm 3, c_real - c_fake = [-2, 0] -> grad [-2/3, 0]
GRAD_VIDEO = [[0.5, -1.0], [-2.0 / 3.0, 0.0]]

X_AUDIO = [[0.5], [-4.0]]
EPS_AUDIO = [[1.0], [1.0]]
REAL_AUDIO = [[1.5], [1.0]]
FAKE_AUDIO = [[1.0], [5.0]]
# sample 0: 0.5 - 1 + 1.5 = 1 -> norm 1, diff 0.5 -> grad 0.5
# sample 1: -4 - 1 + 1 = -4 -> norm 4, diff -4 -> grad -1
GRAD_AUDIO = [[0.5], [-1.0]]

T = [0.5, 0.25]


def dm_case(weights=None):
    x = [torch.tensor(X_VIDEO, requires_grad=True), torch.tensor(X_AUDIO, requires_grad=True)]
    eps = [torch.tensor(EPS_VIDEO), torch.tensor(EPS_AUDIO)]
    real_seen, fake_seen = [], []
    real = constant_velocity([torch.tensor(REAL_VIDEO), torch.tensor(REAL_AUDIO)], real_seen)
    fake = constant_velocity([torch.tensor(FAKE_VIDEO), torch.tensor(FAKE_AUDIO)], fake_seen)
    loss, stats = dm_generator_loss(x, real, fake, torch.tensor(T), eps, weights=weights, names=["video", "audio"])
    return x, eps, loss, stats, real_seen, fake_seen


def test_dm_gradient_by_hand_per_sample_and_per_tensor():
    x, _, loss, stats, _, _ = dm_case()
    loss.backward()
    # each tensor is averaged over its own elements: video has 4, audio 2
    torch.testing.assert_close(x[0].grad, torch.tensor(GRAD_VIDEO) / 4)
    torch.testing.assert_close(x[1].grad, torch.tensor(GRAD_AUDIO) / 2)
    loss_video = 0.5 * (0.25 + 1.0 + 4.0 / 9.0) / 4
    loss_audio = 0.5 * (0.25 + 1.0) / 2
    assert stats["dm_loss/video"].item() == pytest.approx(loss_video)
    assert stats["dm_loss/audio"].item() == pytest.approx(loss_audio)
    assert loss.item() == pytest.approx(loss_video + loss_audio)
    # normalisers mean|x - x0_real| = t * mean|x - eps + c_real|, per sample, then averaged for the log
    assert stats["dm_norm/video"].item() == pytest.approx((0.5 * 2 + 0.25 * 3) / 2)
    assert stats["dm_norm/audio"].item() == pytest.approx((0.5 * 1 + 0.25 * 4) / 2)


def test_dm_per_tensor_weights_scale_only_their_tensor():
    x, _, loss, stats, _, _ = dm_case(weights=[1.0, 2.0])
    loss.backward()
    torch.testing.assert_close(x[0].grad, torch.tensor(GRAD_VIDEO) / 4)
    torch.testing.assert_close(x[1].grad, 2.0 * torch.tensor(GRAD_AUDIO) / 2)
    assert loss.item() == pytest.approx(stats["dm_loss/video"].item() + 2.0 * stats["dm_loss/audio"].item())


def test_dm_scores_see_the_noised_sample_and_no_graph():
    x, eps, _, _, real_seen, fake_seen = dm_case()
    t = torch.tensor(T)
    for seen in (real_seen, fake_seen):
        (xs, t_seen), = seen
        torch.testing.assert_close(t_seen, t)
        for xi, e, xt in zip(x, eps, xs):
            torch.testing.assert_close(xt, add_noise(xi.detach(), e, t))
            assert not xt.requires_grad


def test_dm_loss_gives_no_gradient_to_the_critic():
    critic = nn.Linear(2, 2)
    x = [torch.randn(3, 2, requires_grad=True)]
    loss, _ = dm_generator_loss(
        x, constant_velocity([torch.zeros(3, 2)]), lambda xs, t: [critic(xs[0])], torch.full((3,), 0.5), [torch.randn(3, 2)]
    )
    loss.backward()
    assert critic.weight.grad is None and x[0].grad is not None


def test_dm_normaliser_is_per_modality_not_shared():
    """Audio latents 100x smaller than video must still get a unit-scale gradient of their own."""
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(2, 64, generator=g), 0.01 * torch.randn(2, 4, generator=g)
    x = [video.clone().requires_grad_(), audio.clone().requires_grad_()]
    t = torch.full((2,), 0.5)
    # real predicts x0 = 0 (velocity x_t / t), fake predicts x0 = x (pushes towards 0 at unit scale)
    real = lambda xs, t: [xt / 0.5 for xt in xs]  # noqa: E731
    eps = [torch.zeros_like(video), torch.zeros_like(audio)]
    fake = lambda xs, t: [(xt - xi.detach()) / 0.5 for xt, xi in zip(xs, x)]  # noqa: E731
    loss, stats = dm_generator_loss(x, real, fake, t, eps)
    loss.backward()
    # grad = (x - 0) / mean|x - 0| per sample: mean |grad| == 1 in both tensors
    for xi in x:
        per_elem = xi.grad * xi.numel()
        torch.testing.assert_close(per_elem.abs().mean(1), torch.ones(2))


def test_dm_norm_floor_keeps_the_loss_finite():
    x = [torch.ones(2, 3, requires_grad=True)]
    t = torch.full((2,), 0.5)
    eps = [torch.ones(2, 3)]
    # x_t = 1, real velocity 0 -> x0_real = 1 = x: the normaliser is 0
    loss, stats = dm_generator_loss(x, constant_velocity([torch.zeros(2, 3)]), constant_velocity([torch.ones(2, 3)]), t, eps)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x[0].grad).all()


def test_dm_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="weights"):
        dm_case(weights=[1.0])


# --- critic ------------------------------------------------------------------------------------


def test_critic_loss_by_hand_and_detached_samples():
    x = [torch.tensor([[1.0, 2.0]], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    eps = [torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0]])]
    t = torch.tensor([0.25])
    seen = []
    w = nn.Parameter(torch.tensor(1.0))
    base = constant_velocity([torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0]])], seen)

    def critic(xs, t):
        return [w * v for v in base(xs, t)]

    loss, stats = critic_loss(x, critic, t, eps, names=["video", "audio"])
    # targets eps - x: video [-1, -1] -> mse 1; audio [-4] -> mse 16
    assert stats["critic_loss/video"].item() == pytest.approx(1.0)
    assert stats["critic_loss/audio"].item() == pytest.approx(16.0)
    assert loss.item() == pytest.approx(17.0)
    (xs, _), = seen
    torch.testing.assert_close(xs[0], torch.tensor([[0.75, 1.75]]))  # 0.75 x + 0.25 eps
    torch.testing.assert_close(xs[1], torch.tensor([[2.0]]))
    loss.backward()
    assert x[0].grad is None and x[1].grad is None  # the student gets nothing from the critic's loss


def test_critic_loss_is_zero_for_the_true_velocity():
    x, eps = [torch.randn(4, 3)], [torch.randn(4, 3)]
    loss, _ = critic_loss(x, lambda xs, t: [eps[0] - x[0]], torch.rand(4), eps)
    assert loss.item() == pytest.approx(0.0)


# --- GAN ---------------------------------------------------------------------------------------


def test_gan_losses_by_hand():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731  softplus
    assert gan_generator_loss(fake).item() == pytest.approx((sp(1.0) + sp(-1.0)) / 2)
    assert gan_discriminator_loss(real, fake).item() == pytest.approx((sp(0.0) + sp(-2.0)) / 2 + (sp(-1.0) + sp(1.0)) / 2)
    acc = gan_accuracy(real, fake)
    assert acc["gan_acc/real"].item() == 0.5 and acc["gan_acc/fake"].item() == 0.5
    # a confident, correct classifier: discriminator loss -> 0, generator loss large
    assert gan_discriminator_loss(torch.tensor([20.0]), torch.tensor([-20.0])).item() < 1e-6
    assert gan_generator_loss(torch.tensor([-20.0])).item() == pytest.approx(20.0, rel=1e-6)


def test_gan_head_shapes_and_masked_pooling():
    torch.manual_seed(0)
    head = GANHead(8, 16)
    tokens = torch.randn(3, 5, 8)
    assert head(tokens).shape == (3,)
    assert head(tokens[:, 0]).shape == (3,)
    torch.testing.assert_close(head(tokens), head(tokens.mean(1)))
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, :2] = True
    torch.testing.assert_close(head(tokens, mask), head(tokens[:, :2].mean(1)))
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(2, 3, 4, 8))


def test_gan_generator_gradient_reaches_the_sample():
    torch.manual_seed(0)
    feats, head = nn.Linear(2, 8), GANHead(8)
    x = torch.randn(4, 6, 2, requires_grad=True)
    gan_generator_loss(head(feats(x))).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- two time-scale updates --------------------------------------------------------------------


def test_ttur_bookkeeping():
    assert [s for s in range(12) if is_generator_step(s, 5)] == [0, 5, 10]
    assert all(is_generator_step(s, 1) for s in range(5))
    assert [generator_steps_before(s, 5) for s in (0, 1, 5, 6, 10, 11)] == [0, 1, 1, 2, 2, 3]
    for n in (1, 3, 5):
        for step in range(30):
            assert generator_steps_before(step, n) == sum(is_generator_step(s, n) for s in range(step))
    with pytest.raises(ValueError):
        is_generator_step(3, 0)


# --- timesteps ---------------------------------------------------------------------------------


def test_dm_timesteps_range_shift_and_seed():
    t = dm_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.min() >= 0.02 and t.max() <= 0.98
    assert abs(t.mean().item() - 0.5) < 0.01  # uniform
    shifted = dm_timesteps(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert shifted.min() >= 0.02 and shifted.max() <= 0.98 and shifted.mean() > 0.65
    # The shifted density restricted to [t_min, t_max], with no mass piled on the ends: the
    # fraction below time_shift(u) is the fraction of the unshifted range below u.
    t6 = dm_timesteps(20000, shift=6.0, generator=torch.Generator().manual_seed(2))
    assert (t6 == 0.98).float().mean() < 0.001 and (t6 == 0.02).float().mean() < 0.001
    lo, hi = time_unshift(0.02, 6.0), time_unshift(0.98, 6.0)
    for u in (0.01, 0.05, 0.2, 0.6):
        want = (u - lo) / (hi - lo)
        assert abs((t6 <= time_shift(torch.tensor(u), 6.0)).float().mean().item() - want) < 0.01
    torch.testing.assert_close(dm_timesteps(8, generator=torch.Generator().manual_seed(1)), dm_timesteps(8, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="t_min"):
        dm_timesteps(4, t_min=0.5, t_max=0.5)


# --- backward simulation and the few-step sampler ----------------------------------------------


def affine_student(xs, t):
    """A student with a known velocity: v = 0.5 x + t."""
    return [0.5 * x + t.view(-1, *([1] * (x.dim() - 1))) for x in xs]


def hand_rolled(noise, ts, k, generator):
    xs = [n.clone() for n in noise]
    for i in range(k):
        nxt = []
        for x in xs:
            x0 = x - ts[i] * (0.5 * x + ts[i])
            e = torch.randn(x.shape, generator=generator)
            nxt.append((1 - ts[i + 1]) * x0 + ts[i + 1] * e)
        xs = nxt
    return xs


def test_backward_simulation_follows_the_students_own_trajectory():
    ts = sampling_schedule(8, 3.0)
    tl = ts.tolist()
    noise = [torch.randn(2, 3, 4), torch.randn(2, 5)]
    for k in (0, 1, 4, 7):
        got = backward_simulate(affine_student, noise, ts, k, torch.Generator().manual_seed(7))
        want = hand_rolled(noise, tl, k, torch.Generator().manual_seed(7))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    for a, b in zip(backward_simulate(affine_student, noise, ts, 0, None), noise):
        torch.testing.assert_close(a, b)  # exit 0: pure noise


def test_generate_at_has_grad_only_through_the_last_step():
    torch.manual_seed(0)
    net = nn.Linear(4, 4)
    student = lambda xs, t: [net(xs[0])]  # noqa: E731
    ts = sampling_schedule(8, 1.0)
    noise = [torch.randn(3, 4)]
    x_in = backward_simulate(student, noise, ts, 5, torch.Generator().manual_seed(1))
    assert not x_in[0].requires_grad
    out = student_generate_at(student, noise, ts, 5, torch.Generator().manual_seed(1))
    assert out[0].requires_grad
    out[0].sum().backward()
    got = net.weight.grad.clone()
    net.zero_grad()
    t5 = ts[5].item()
    (x_in[0] - t5 * net(x_in[0])).sum().backward()  # one step from the simulated input
    torch.testing.assert_close(got, net.weight.grad)


def test_student_sample_matches_backward_simulation_then_one_step():
    ts = sampling_schedule(8, 3.0)
    noise = [torch.randn(2, 6), torch.randn(2, 3)]
    full = student_sample(affine_student, noise, ts, torch.Generator().manual_seed(3))
    last = student_generate_at(affine_student, noise, ts, 7, torch.Generator().manual_seed(3))
    for a, b in zip(full, last):
        torch.testing.assert_close(a, b)
    # one step: x0 = eps - v(eps, 1) = 0.5 eps - 1
    one = student_sample(affine_student, noise, torch.tensor([1.0, 0.0]), None)
    torch.testing.assert_close(one[0], 0.5 * noise[0] - 1)


def test_schedule_and_exit_index_are_validated():
    noise = [torch.randn(1, 2)]
    with pytest.raises(ValueError, match="exit_index"):
        backward_simulate(affine_student, noise, sampling_schedule(4, 1.0), 4)
    with pytest.raises(ValueError, match="end at 0"):
        backward_simulate(affine_student, noise, torch.tensor([1.0, 0.5]), 0)
    with pytest.raises(ValueError, match="decrease"):
        student_sample(affine_student, noise, torch.tensor([1.0, 1.0, 0.0]))


def test_exit_index_depends_only_on_the_seed():
    draws = [random_exit_index(8, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == set(range(8))
    torch.manual_seed(123)  # the global RNG (which differs per rank) plays no part
    again = [random_exit_index(8, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again
    assert random_exit_index(1, torch.Generator().manual_seed(0)) == 0


def test_noise_like_is_reproducible_and_shaped():
    xs = [torch.zeros(2, 3), torch.zeros(2, 4, 5, dtype=torch.float64)]
    a, b = noise_like(xs, torch.Generator().manual_seed(0)), noise_like(xs, torch.Generator().manual_seed(0))
    for x, u, v in zip(xs, a, b):
        assert u.shape == x.shape and u.dtype == x.dtype
        torch.testing.assert_close(u, v)


def test_gan_head_in_bf16_takes_any_features_and_gives_float32_logits():
    """Under DeepSpeed's bf16 the head's weights are bf16 (the critic's features too): it pools
    in float32, runs in its own dtype and returns float32 logits for the losses."""
    torch.manual_seed(0)
    head = GANHead(8, 16)
    tokens = torch.randn(3, 5, 8)
    want = head(tokens)
    head = head.to(torch.bfloat16)
    for features in (tokens, tokens.to(torch.bfloat16)):
        got = head(features)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
