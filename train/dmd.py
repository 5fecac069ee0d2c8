"""DMD-2 distillation math, independent of any network.

DMD-2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis")
trains a few-step student G so that the distribution of its samples matches the teacher's. At a
random noise level t, the student's sample x is re-noised to x_t and two denoisers are asked for
x0: the frozen teacher with classifier-free guidance (the "real" score) and a trainable critic
(the "fake" score) that is kept fitted, by flow matching, to the student's current samples. The
difference of their predictions is the gradient of KL(p_student || p_teacher) w.r.t. x (up to a
positive weight), and the student follows it. DMD-2 adds: no regression loss, two time-scale
updates (several critic steps per generator step), a GAN term from a classifier head on the
critic's features, and backward simulation so a multi-step student is trained on inputs it
produced itself.

Conventions are train/flow.py's: t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t eps, the
networks predict the velocity v = eps - x0, hence x0_hat = x_t - t v.

A "sample" is a list of tensors matched jointly (e.g. [video latents, audio latents]), each with
the batch first. Every loss is normalised and averaged PER TENSOR and then summed (optionally
weighted): audio is ~0.5% of the tokens, and one shared normaliser or one shared mean would leave
it without signal. Networks enter as callables

    velocity_fn(xs: list[Tensor], t: Tensor (B,)) -> list[Tensor]

that close over conditioning and guidance (the teacher's callable applies flow.cfg_combine,
uncond + s * (cond - uncond), with per-modality scales). Each loss is its own short function, as
in DMD2's code; the training loop decides which to call when (see `is_generator_step`).
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from train.flow import add_noise, time_shift, time_unshift

Velocity = Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]

NORM_FLOOR = 1e-5  # smallest DM-gradient normaliser: x == x0_real exactly would divide by zero


# --- small helpers ---------------------------------------------------------------------------


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching x's rank, in float32."""
    return t.view(-1, *([1] * (x.dim() - 1))).float()


# One generator for the batch, one per sample, or None (torch's global generator).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal shaped like x. With a generator the draw happens on the generator's device in
    float32, so the same seed gives the same numbers whatever x's device or dtype. A sequence of
    generators, one per sample along x's first dimension, draws each sample's noise from its own
    (the sampler's: a clip then depends on its own seed, not on the clips batched with it)."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    else:
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: give one per sample")
        z = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator])
    return z.to(device=x.device, dtype=x.dtype)


def noise_like(xs: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One standard-normal tensor per tensor of the sample (the eps of the DM / critic losses)."""
    return [_randn_like(x, generator) for x in xs]


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t - t v (flow convention), t (B,) broadcast; computed in float32."""
    return x_t.float() - _bcast(t, x_t) * v.float()


def _names(xs: Sequence[torch.Tensor], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [str(i) for i in range(len(xs))]
    if len(names) != len(xs):
        raise ValueError(f"names={list(names)} has {len(names)} entries for {len(xs)} tensors")
    return list(names)


def _weights(xs: Sequence[torch.Tensor], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(xs)
    if len(weights) != len(xs):
        raise ValueError(f"weights={list(weights)} has {len(weights)} entries for {len(xs)} tensors")
    return [float(w) for w in weights]


def _batch_time(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


# --- timesteps -------------------------------------------------------------------------------


def dm_timesteps(
    batch: int,
    t_min: float = 0.02,
    t_max: float = 0.98,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Noise levels of the DM and critic losses: uniform in [0, 1] warped by the teacher's shift
    (flow.time_shift, so large token counts get more high-noise levels, as the teacher was
    trained), restricted to [t_min, t_max]. The ends are cut because at t ~ 0 both scores agree
    with x (no signal) and at t ~ 1 both predict the data mean. The uniform draw is taken between
    the unshifted ends, so the shift lands it inside [t_min, t_max] with the warped density (a
    clamp after the shift would pile the draws beyond the ends onto them: 9% on t_max at shift 6).
    Returns (batch,)."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"dm timesteps: need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    lo, hi = time_unshift(t_min, shift), time_unshift(t_max, shift)
    u = lo + (hi - lo) * torch.rand(batch, generator=generator)
    return time_shift(u, shift).clamp(t_min, t_max).to(device)  # the clamp only mends float rounding at the ends


# --- losses ----------------------------------------------------------------------------------


def dm_generator_loss(
    x: Sequence[torch.Tensor],
    real_velocity: Velocity,
    fake_velocity: Velocity,
    t: torch.Tensor,
    eps: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distribution-matching loss of the generator (DMD eq. 7, DMD-2 sec. 4).

    x: the student's samples, with grad. They are re-noised to x_t at t with eps; without grad the
    teacher (real_velocity, guided by the caller) and the critic (fake_velocity) predict x0. The
    KL gradient w.r.t. x is proportional to x0_fake - x0_real: move away from where the critic
    thinks the student's samples are, towards where the teacher thinks data is. As in DMD it is
    divided, per sample and per tensor, by mean|x - x0_real| over the non-batch dims, which makes
    its size independent of t and of each modality's latent scale. The loss
    0.5 * mean((x - sg(x - grad))^2) has gradient grad / numel w.r.t. x, so an optimiser step moves
    x along -grad. Returns (weighted sum over tensors of the per-tensor losses, stats).

    stats (detached scalars, per tensor name): dm_loss/<name>, dm_norm/<name> (mean normaliser),
    dm_gap/<name> (mean |x0_fake - x0_real| before normalising)."""
    names, weights = _names(x, names), _weights(x, weights)
    with torch.no_grad():
        x_t = [add_noise(xi.detach(), e, t) for xi, e in zip(x, eps)]
        x0_real = [x0_from_velocity(xt, v, t) for xt, v in zip(x_t, real_velocity(x_t, t))]
        x0_fake = [x0_from_velocity(xt, v, t) for xt, v in zip(x_t, fake_velocity(x_t, t))]
    total, stats = 0.0, {}
    for xi, real, fake, w, name in zip(x, x0_real, x0_fake, weights, names):
        with torch.no_grad():
            xf = xi.detach().float()
            norm = (xf - real).abs().flatten(1).mean(1).clamp_min(NORM_FLOOR)
            grad = (fake - real) / _bcast(norm, xf)
            target = xf - grad
        loss = 0.5 * F.mse_loss(xi.float(), target)
        total = total + w * loss
        stats[f"dm_loss/{name}"] = loss.detach()
        stats[f"dm_norm/{name}"] = norm.mean()
        stats[f"dm_gap/{name}"] = (fake - real).abs().mean()
    return total, stats


def critic_loss(
    x: Sequence[torch.Tensor],
    fake_velocity: Velocity,
    t: torch.Tensor,
    eps: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-matching loss of the fake-score critic on the student's samples (detached here), so it
    tracks the student's current distribution: target eps - x at x_t = (1 - t) x + t eps. Averaged
    per tensor, then summed (weighted). stats: critic_loss/<name>."""
    names, weights = _names(x, names), _weights(x, weights)
    x = [xi.detach() for xi in x]
    x_t = [add_noise(xi, e, t) for xi, e in zip(x, eps)]
    total, stats = 0.0, {}
    for xi, e, v, w, name in zip(x, eps, fake_velocity(x_t, t), weights, names):
        loss = F.mse_loss(v.float(), (e - xi).float())
        total = total + w * loss
        stats[f"critic_loss/{name}"] = loss.detach()
    return total, stats


class GANHead(nn.Module):
    """DMD-2's classifier on the critic's features (sec. 4.3): one logit per sample, "real data"
    vs "student sample", both noised to the same t. Tokens (B, N, D) are mean-pooled (over the
    True entries of mask (B, N) when given, e.g. only video tokens); (B, D) features are used as
    they are. LayerNorm first, because transformer features at different depths differ in scale."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B,) in float32. Pools in float32, then runs in the head's own dtype (bf16 under
        DeepSpeed's bf16, which keeps the weights in bf16)."""
        features = features.float()
        if features.dim() == 3:
            if mask is None:
                features = features.mean(1)
            else:
                m = mask.to(features.dtype).unsqueeze(-1)
                features = (features * m).sum(1) / m.sum(1).clamp_min(1.0)
        elif features.dim() != 2:
            raise ValueError(f"GANHead: features must be (B, N, D) or (B, D), got {tuple(features.shape)}")
        return self.mlp(self.norm(features.to(self.norm.weight.dtype))).squeeze(-1).float()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log sigmoid(D(fake)) = softplus(-logit): the student wants its
    samples classified as real. Gradient reaches x through the critic's features."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Classifier loss -log sigmoid(D(real)) - log(1 - sigmoid(D(fake))), computed as softplus."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def gan_accuracy(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fraction of real / fake samples the head classifies correctly (logit sign), for logging: a
    head near 1.0 on both has won and its gradient to the generator is saturating."""
    with torch.no_grad():
        return {
            "gan_acc/real": (logits_real > 0).float().mean(),
            "gan_acc/fake": (logits_fake < 0).float().mean(),
        }


# --- two time-scale updates ------------------------------------------------------------------


def is_generator_step(step: int, critic_steps_per_generator_step: int = 5) -> bool:
    """DMD-2 (sec. 4.2) updates the critic every step and the generator every n-th step (n = 5), so
    the critic tracks the moving student distribution; step 0 updates both."""
    if critic_steps_per_generator_step < 1:
        raise ValueError(f"critic_steps_per_generator_step={critic_steps_per_generator_step}: must be >= 1")
    return step % critic_steps_per_generator_step == 0


def generator_steps_before(step: int, critic_steps_per_generator_step: int = 5) -> int:
    """How many generator updates steps 0..step-1 made: the generator's own optimizer/LR/EMA step
    count at a given global step (what a resumed run must restore)."""
    n = critic_steps_per_generator_step
    if n < 1:
        raise ValueError(f"critic_steps_per_generator_step={n}: must be >= 1")
    return (step + n - 1) // n


# --- the few-step student: sampling and backward simulation ----------------------------------


def _check_timesteps(timesteps: torch.Tensor) -> list[float]:
    ts = [float(t) for t in timesteps.flatten()] if torch.is_tensor(timesteps) else [float(t) for t in timesteps]
    if len(ts) < 2 or ts[-1] != 0.0 or any(a <= b for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError(f"student timesteps must decrease strictly and end at 0 (K steps + final 0), got {ts}")
    return ts


def _denoise(student: Velocity, xs: list[torch.Tensor], t: float) -> list[torch.Tensor]:
    """One student evaluation at time t: x0_hat = x_t - t v, in the inputs' dtypes."""
    tb = _batch_time(t, xs[0])
    return [x0_from_velocity(x, v, tb).to(x.dtype) for x, v in zip(xs, student(xs, tb))]


def _renoise(x0: list[torch.Tensor], t: float, generator: Generators) -> list[torch.Tensor]:
    tb = _batch_time(t, x0[0])
    return [add_noise(x, _randn_like(x, generator), tb) for x in x0]


@torch.no_grad()
def backward_simulate(
    student_velocity: Velocity,
    noise: Sequence[torch.Tensor],
    timesteps: torch.Tensor,
    exit_index: int,
    generator: Generators = None,
) -> list[torch.Tensor]:
    """The student's own input at step exit_index of its schedule (DMD-2 sec. 4.5).

    timesteps: (K + 1,) from 1 to 0, the student's K-step schedule plus the final 0. From pure
    noise at timesteps[0], run the student itself for steps 0..exit_index-1: predict x0, then
    re-noise it to the next timestep with FRESH noise (the multi-step sampler of DMD-2 and
    Self-Forcing, `student_sample`). Training on these inputs instead of noised real data removes
    the train/inference mismatch of a few-step student. Fresh noise rather than a deterministic
    Euler step: the student is trained to output clean samples (x0), not velocities along the
    teacher's ODE, and after distillation its "velocity" no longer describes a consistent ODE, so
    its x0 has to be re-noised; this is also what makes its inputs at step k follow the marginal
    at t_k. No gradient flows through these steps (torch.no_grad). exit_index = 0 returns noise."""
    ts = _check_timesteps(timesteps)
    if not 0 <= exit_index < len(ts) - 1:
        raise ValueError(f"exit_index={exit_index}: must be in [0, {len(ts) - 2}] for {len(ts) - 1} student steps")
    xs = [n.detach() for n in noise]
    for i in range(exit_index):
        xs = _renoise(_denoise(student_velocity, xs, ts[i]), ts[i + 1], generator)
    return xs


def student_generate_at(
    student_velocity: Velocity,
    noise: Sequence[torch.Tensor],
    timesteps: torch.Tensor,
    exit_index: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The student's one-step x0 prediction, WITH grad, from its backward-simulated input at step
    exit_index: the generator sample the DM and GAN losses are applied to."""
    ts = _check_timesteps(timesteps)
    xs = backward_simulate(student_velocity, noise, timesteps, exit_index, generator)
    return _denoise(student_velocity, xs, ts[exit_index])


@torch.no_grad()
def student_sample(
    student_velocity: Velocity,
    noise: Sequence[torch.Tensor],
    timesteps: torch.Tensor,
    generator: Generators = None,
) -> list[torch.Tensor]:
    """Inference with the distilled student: the same sampler as backward simulation, run to the
    end; returns the last x0 prediction. K network calls, no guidance. With the same generator its
    first k steps draw exactly the noise backward_simulate(..., k, generator) draws. The re-noising
    must be independent of `noise` (as in training): a generator that drew `noise` must go on from
    there, not be seeded again."""
    ts = _check_timesteps(timesteps)
    xs = [n for n in noise]
    for i in range(len(ts) - 1):
        x0 = _denoise(student_velocity, xs, ts[i])
        if i + 1 < len(ts) - 1:
            xs = _renoise(x0, ts[i + 1], generator)
    return x0


def random_exit_index(num_steps: int, generator: torch.Generator) -> int:
    """Uniform exit step in [0, num_steps - 1] for backward simulation.

    Multi-process runs: every rank must draw the SAME index. The number of student forwards per
    step depends on it, and under ZeRO-3 each forward all-gathers parameters collectively, so
    ranks that disagree wait on each other forever. Seed the generator from (seed, global step),
    never from the rank (or draw on rank 0 and broadcast it)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be >= 1")
    return int(torch.randint(0, num_steps, (1,), generator=generator).item())
