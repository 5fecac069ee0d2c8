"""DMD-2 on a problem with a known answer: a 2-D mixture of Gaussians.

The teacher is the exact flow-matching velocity of the mixture (closed form below), so its 50-step
Euler samples are a near-perfect reference. A small MLP student is distilled from it into an
8-step (and 1-step) sampler with the SAME functions the video model uses (train/dmd.py): DM loss
against the teacher and an MLP critic (fake score), critic trained by flow matching on the
student's samples, two time-scale updates, backward simulation over the 8-step schedule, and a
GAN head on the critic's features against real draws from the mixture. Quality is the energy
distance of 2-D samples to a large draw from the true mixture.

DMD-2 initialises student and critic from the teacher. The closed-form teacher is not an MLP, so
an MLP is first regressed onto the teacher's velocity and both start from that fit ("student
before DMD": that MLP sampled with 1 or 8 Euler steps, which is poor: one step lands on the
posterior mean, the centre of the circle).

    python bench/dmd_gmm.py            # long run, writes bench/results/dmd_gmm_<date>.json
    python bench/dmd_gmm.py --quick    # the test's settings

tests/test_dmd_gmm.py imports this file and runs the quick settings.
"""

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.dmd import (  # noqa: E402
    GANHead,
    critic_loss,
    dm_generator_loss,
    dm_timesteps,
    gan_accuracy,
    gan_discriminator_loss,
    gan_generator_loss,
    is_generator_step,
    noise_like,
    random_exit_index,
    student_generate_at,
    student_sample,
)
from train.flow import add_noise, euler_sample, sampling_schedule  # noqa: E402


# --- the teacher: a Gaussian mixture and its exact velocity ----------------------------------


class GaussianMixture:
    """K isotropic components N(mu_k, s^2 I) with equal weights, means on a circle."""

    def __init__(self, n_components: int = 8, radius: float = 2.0, sigma: float = 0.1):
        angles = torch.arange(n_components, dtype=torch.float64) * (2 * math.pi / n_components)
        self.means = radius * torch.stack([angles.cos(), angles.sin()], 1)  # (K, 2)
        self.sigma = sigma
        self.log_pi = torch.full((n_components,), -math.log(n_components), dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, len(self.means), (n,), generator=generator)
        return (self.means[k] + self.sigma * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[eps - x0 | x_t = x] for x_t = (1 - t) x0 + t eps.

        Given component k, x_t ~ N(a mu_k, S I) with a = 1 - t, S = a^2 s^2 + t^2, and (x0, eps, x_t)
        are jointly Gaussian, so E[x0 | x_t, k] = mu_k + (a s^2 / S)(x_t - a mu_k) and
        E[eps | x_t, k] = (t / S)(x_t - a mu_k). The posterior over k is a softmax of
        log pi_k + log N(x_t; a mu_k, S I); v = sum_k w_k (E[eps | k] - E[x0 | k])."""
        x64, t64 = x.double(), t.double().view(-1, 1, 1)  # (B, 1, 1)
        a = 1 - t64
        var = a.square() * self.sigma**2 + t64.square()  # (B, 1, 1), same for every k
        diff = x64.unsqueeze(1) - a * self.means.unsqueeze(0)  # (B, K, 2)
        logits = self.log_pi - 0.5 * diff.square().sum(-1) / var.squeeze(-1)  # the 1/S normaliser is k-free
        w = logits.softmax(-1).unsqueeze(-1)  # (B, K, 1)
        e_x0 = self.means.unsqueeze(0) + (a * self.sigma**2 / var) * diff
        e_eps = (t64 / var) * diff
        return (w * (e_eps - e_x0)).sum(1).to(x.dtype)

    def velocity_fn(self, xs, t):
        return pointwise(self.velocity, xs, t)


def pointwise(fn, xs, t):
    """A sample is (B, N, 2): N independent points sharing one t, like the tokens of a clip. Apply
    a per-point velocity fn((M, 2), (M,)) to it. Why N > 1: the DM gradient is normalised by
    mean|x - x0_real| over a sample's elements, and over only 2 numbers that mean comes near 0
    often enough to give the gradient a heavy tail (infinite variance); over 2N it concentrates,
    as it does over the ~10^5 elements of a video latent."""
    x = xs[0]
    b, n, _ = x.shape
    return [fn(x.reshape(b * n, 2), t.repeat_interleave(n)).view(b, n, 2)]


# --- the networks ----------------------------------------------------------------------------


class VelocityMLP(nn.Module):
    """(x_t, t) -> velocity, with Fourier features of t. `features` is the last hidden layer, read
    by the GAN head when the MLP is the critic."""

    def __init__(self, hidden: int = 128, depth: int = 3, n_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freqs, dtype=torch.float32), persistent=False)
        layers, width = [], 2 + 1 + 2 * n_freqs
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, 2)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ft = t.view(-1, 1) * self.freqs
        return self.body(torch.cat([x, t.view(-1, 1), ft.sin(), ft.cos()], 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x, t))

    def velocity_fn(self, xs, t):
        return pointwise(self, xs, t)

    def token_features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, N, 2), (B,) -> (B, N, hidden): per-point features, like a transformer's tokens."""
        b, n, _ = x.shape
        return self.features(x.reshape(b * n, 2), t.repeat_interleave(n)).view(b, n, -1)


def fit_to_teacher(net: VelocityMLP, gmm: GaussianMixture, steps: int, batch: int, lr: float, generator):
    """Regress the MLP onto the teacher's velocity at noised mixture samples, t ~ U(0, 1). The
    exact conditional mean is the target (not eps - x0), so few steps suffice."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0 = gmm.sample(batch, generator)
        t = torch.rand(batch, generator=generator)
        x_t = add_noise(x0, torch.randn(batch, 2, generator=generator), t)
        loss = (net(x_t, t) - gmm.velocity(x_t, t)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


# --- the metric ------------------------------------------------------------------------------


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), the within-set terms
    without the diagonal (unbiased), so two draws from one distribution give ~0 (+- noise)."""
    a, b = a.double(), b.double()
    n, m = len(a), len(b)
    d_ab = torch.cdist(a, b).mean()
    d_aa = torch.cdist(a, a).sum() / (n * (n - 1))
    d_bb = torch.cdist(b, b).sum() / (m * (m - 1))
    return float(2 * d_ab - d_aa - d_bb)


# --- DMD-2 -----------------------------------------------------------------------------------


@dataclass
class Config:
    """The bench's settings; QUICK (below) is what tests/test_dmd_gmm.py runs."""

    seed: int = 0
    n_components: int = 8
    radius: float = 2.0
    sigma: float = 0.1
    hidden: int = 256
    depth: int = 3
    fit_steps: int = 1500  # regression of the MLP onto the teacher (the "teacher" student and critic start from)
    fit_lr: float = 3e-3
    steps: int = 10000  # DMD steps: critic every step, generator every `ttur`-th
    batch: int = 16  # samples per batch
    points: int = 16  # 2-D points per sample (see `pointwise`)
    ttur: int = 5
    student_steps: int = 8
    shift: float = 1.0  # of the student schedule and of the DM timesteps
    gen_lr: float = 3e-4
    critic_lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.999)
    grad_clip: float = 10.0
    ema_decay: float = 0.99  # per generator step; the EMA student is the one evaluated
    gan_gen_weight: float = 3e-2  # 0 turns the GAN term off
    gan_cls_weight: float = 1e-1
    gan_per_point: bool = True  # classify each 2-D point (a density ratio), not pooled sets of N
    eval_n: int = 5000
    teacher_steps: int = 50


QUICK = dict(hidden=128, fit_steps=300, steps=1500, eval_n=2000)


def distill(cfg: Config, gmm: GaussianMixture, init: VelocityMLP, log_every: int = 0, callback=None):
    """DMD-2 from `init` (the teacher-fitted MLP): the training loop only decides which train/dmd.py
    loss to call when. Returns the EMA student and the last step's stats. callback(step, student,
    stats), when given, runs every log_every steps (default: print the stats)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    student, critic = copy.deepcopy(init), copy.deepcopy(init)
    ema = copy.deepcopy(student).requires_grad_(False)
    head = GANHead(cfg.hidden, 64)
    opt_g = torch.optim.Adam(student.parameters(), lr=cfg.gen_lr, betas=cfg.betas)
    critic_params = list(critic.parameters()) + list(head.parameters())
    opt_c = torch.optim.Adam(critic_params, lr=cfg.critic_lr, betas=cfg.betas)
    ts = sampling_schedule(cfg.student_steps, cfg.shift)
    use_gan = cfg.gan_gen_weight > 0
    stats = {}

    def noised_features(x, t):
        """Critic features of x noised to t: per point (B * N, D), or per sample (B, N, D) pooled by the head."""
        f = critic.token_features(add_noise(x, torch.randn(x.shape, generator=g), t), t)
        return f.flatten(0, 1) if cfg.gan_per_point else f

    for step in range(cfg.steps):
        # The exit step comes from a generator seeded by (seed, step) only: the same on every rank.
        k = random_exit_index(cfg.student_steps, torch.Generator().manual_seed(cfg.seed * 100003 + step))
        noise = [torch.randn(cfg.batch, cfg.points, 2, generator=g)]
        if is_generator_step(step, cfg.ttur):
            critic.requires_grad_(False)  # the generator's losses reach x through the critic, not its weights
            x = student_generate_at(student.velocity_fn, noise, ts, k, g)
            t = dm_timesteps(cfg.batch, shift=cfg.shift, generator=g)
            loss, stats = dm_generator_loss(x, gmm.velocity_fn, critic.velocity_fn, t, noise_like(x, g))
            if use_gan:
                gl = gan_generator_loss(head(noised_features(x[0], t)))
                loss = loss + cfg.gan_gen_weight * gl
                stats["gan_gen"] = gl.detach()
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt_g.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), student.parameters()):
                    pe.lerp_(p, 1 - cfg.ema_decay)
            critic.requires_grad_(True)
            x = [xi.detach() for xi in x]  # DMD2 reuses the generator's samples for the critic step
        else:
            with torch.no_grad():
                x = student_generate_at(student.velocity_fn, noise, ts, k, g)
        t = dm_timesteps(cfg.batch, shift=cfg.shift, generator=g)
        closs, cstats = critic_loss(x, critic.velocity_fn, t, noise_like(x, g))
        stats.update(cstats)
        if use_gan:
            real = gmm.sample(cfg.batch * cfg.points, g).view(cfg.batch, cfg.points, 2)
            logits_real, logits_fake = head(noised_features(real, t)), head(noised_features(x[0], t))
            dl = gan_discriminator_loss(logits_real, logits_fake)
            closs = closs + cfg.gan_cls_weight * dl
            stats.update(gan_accuracy(logits_real, logits_fake), gan_cls=dl.detach())
        opt_c.zero_grad(set_to_none=True)
        closs.backward()
        nn.utils.clip_grad_norm_(critic_params, cfg.grad_clip)
        opt_c.step()
        if log_every and step % log_every == 0:
            if callback is None:
                print(step, {k_: round(float(v), 4) for k_, v in stats.items()}, flush=True)
            else:
                callback(step, ema, stats)
    return ema, stats


def mode_stats(gmm: GaussianMixture, x: torch.Tensor) -> dict:
    """Why a distance is what it is: relative s.d. of the per-component counts (mode weights;
    ~0.04 for 5000 true draws), the smallest component's count over the mean count (mode
    collapse reads ~0), and s.d. of the offset from the nearest mean (the mixture's sigma for true
    draws; larger = blur or points between modes)."""
    x = x.reshape(-1, 2).double()
    nearest = torch.cdist(x, gmm.means).argmin(1)
    counts = torch.bincount(nearest, minlength=len(gmm.means)).double()
    return {
        "mode_count_rel_sd": round(float(counts.std() / counts.mean()), 4),
        "min_mode_share": round(float(counts.min() / counts.mean()), 4),
        "offset_sd": round(float((x - gmm.means[nearest]).std()), 4),
    }


def run(cfg: Config, log_every: int = 0) -> dict:
    """Energy distance to a draw from the true mixture, for every sampler the report compares."""
    torch.manual_seed(cfg.seed)
    gmm = GaussianMixture(cfg.n_components, cfg.radius, cfg.sigma)
    g_eval = torch.Generator().manual_seed(cfg.seed + 12345)
    reference = gmm.sample(cfg.eval_n, g_eval)
    eval_noise = [torch.randn(cfg.eval_n, 1, 2, generator=g_eval)]
    ts8, ts1 = sampling_schedule(cfg.student_steps, cfg.shift), sampling_schedule(1, cfg.shift)
    ts_teacher = sampling_schedule(cfg.teacher_steps, cfg.shift)
    samples = {}

    def renoise_gen():
        return torch.Generator().manual_seed(cfg.seed + 999)

    samples["true_mixture_fresh_draw"] = gmm.sample(cfg.eval_n, g_eval)
    samples["teacher_50step"] = euler_sample(_float_t(gmm.velocity_fn), eval_noise, ts_teacher)[0]
    untrained = VelocityMLP(cfg.hidden, cfg.depth)
    samples["untrained_1step"] = student_sample(untrained.velocity_fn, eval_noise, ts1, renoise_gen())[0]
    samples["untrained_8step"] = student_sample(untrained.velocity_fn, eval_noise, ts8, renoise_gen())[0]

    fitted = copy.deepcopy(untrained)
    t0 = time.perf_counter()
    fit_mse = fit_to_teacher(fitted, gmm, cfg.fit_steps, cfg.batch * cfg.points, cfg.fit_lr, torch.Generator().manual_seed(cfg.seed + 2))
    fit_s = time.perf_counter() - t0
    fitted_v = _float_t(fitted.velocity_fn)
    samples["before_dmd_1step_euler"] = euler_sample(fitted_v, eval_noise, ts1)[0]
    samples["before_dmd_8step_euler"] = euler_sample(fitted_v, eval_noise, ts8)[0]
    samples["before_dmd_8step_student_sampler"] = student_sample(fitted.velocity_fn, eval_noise, ts8, renoise_gen())[0]

    t0 = time.perf_counter()
    student, stats = distill(cfg, gmm, fitted, log_every)
    dmd_s = time.perf_counter() - t0
    samples["after_dmd_1step"] = student_sample(student.velocity_fn, eval_noise, ts1, renoise_gen())[0]
    samples["after_dmd_8step"] = student_sample(student.velocity_fn, eval_noise, ts8, renoise_gen())[0]
    return {
        "energy_distance": {k: round(energy_distance(x.reshape(-1, 2), reference), 5) for k, x in samples.items()},
        "mode_stats": {k: mode_stats(gmm, x) for k, x in samples.items()},
        "fit_final_mse": round(fit_mse, 5),
        "last_train_stats": {k: round(float(v), 5) for k, v in stats.items()},
        "timings_s": {"fit": round(fit_s, 2), "dmd": round(dmd_s, 2)},
    }


def _float_t(velocity_fn):
    """flow.euler_sample passes t as a float; our callables take (B,) tensors."""
    return lambda xs, t: velocity_fn(xs, torch.full((xs[0].shape[0],), float(t)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the test's settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gan", action="store_true")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/dmd_gmm_<date>.json)")
    args = p.parse_args()
    cfg = Config(seed=args.seed, **(QUICK if args.quick else {}))
    if args.no_gan:
        cfg.gan_gen_weight = 0.0
    t0 = time.perf_counter()
    measured = run(cfg, args.log_every)
    result = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": asdict(cfg),
        **measured,
    }
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"dmd_gmm_{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
