"""The DMD-2 LightningModule on a fixed in-memory batch: two time-scale updates touch only the
network they should (weights and optimizer state), the teacher stays frozen and out of the
checkpoint, NaN losses are skipped and counted and eventually stop the run."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.test_pretrain_module import FPS, SR, Repeat, fixed_batch, tiny_args
from model import AVTransformer
from train.checkpoint import describe
from train.codec import PatchCodec
from train.config import ConfigError, DistillConfig, OptimConfig, RunConfig
from train.distill import DistillModule, NonFiniteLossError


def make_module(ema_decay=0.0, trim_text=True, **distill):
    codec = PatchCodec()
    args = tiny_args(codec, 32)
    torch.manual_seed(0)
    teacher = AVTransformer(args)
    with torch.no_grad():  # a teacher whose outputs are not all zero (zero-initialised heads)
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student, critic = copy.deepcopy(teacher), copy.deepcopy(teacher)
    meta = describe(teacher.args, codec, FPS, SR, 1, 16, (256, 1.0, 3.0))
    meta["student"] = {"steps": 4, "timesteps": None}
    cfg = DistillConfig(student_steps=4, **distill)
    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", betas=(0.9, 0.999))
    return DistillModule(student, critic, teacher, codec, cfg, optim, optim, RunConfig(run_dir="unused", ema_decay=ema_decay, ema_every_n_steps=1, trim_text=trim_text), meta)


def snapshot(module):
    opt_student = module.trainer.optimizers[0]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt_student.state.items()}
    return [p.detach().clone() for p in module.student.parameters()], state, [p.detach().clone() for p in module.critic.parameters()]


class Recorder(L.Callback):
    """The student's and critic's weights and the student's optimizer state after every step."""

    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(snapshot(module))


def fit(module, steps):
    rec = Recorder()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[rec])
    trainer.fit(module, DataLoader(Repeat(fixed_batch(), steps), batch_size=None))
    return rec, trainer


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def same_state(a, b):
    return a.keys() == b.keys() and all(
        all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa) for sa, sb in ((a[i], b[i]) for i in a)
    )


def test_critic_only_steps_leave_the_student_and_its_optimizer_untouched():
    module = make_module(critic_steps_per_generator_step=3)
    initial_student = [p.detach().clone() for p in module.student.parameters()]
    rec, trainer = fit(module, 5)
    assert trainer.global_step == 5  # iterations, not optimizer calls
    (s0, o0, c0), (s1, o1, c1), (s2, o2, c2), (s3, o3, c3), _ = rec.after
    # step 0 updates both networks
    assert not same(s0, initial_student) and o0
    # steps 1 and 2 are critic-only: student weights and Adam moments/step counts unchanged
    assert same(s1, s0) and same(s2, s0)
    assert same_state(o1, o0) and same_state(o2, o0)
    assert not same(c1, c0) and not same(c2, c1)  # ...while the critic moves every step
    # step 3 is the next generator step
    assert not same(s3, s2) and not same_state(o3, o2)
    assert [int(s["step"]) for s in o3.values()][0] == 2  # two student updates in four steps


def test_teacher_is_frozen_and_not_checkpointed():
    module = make_module()
    before = [p.detach().clone() for p in module.teacher.parameters()]
    _, trainer = fit(module, 2)
    assert not module.teacher.training and all(not p.requires_grad for p in module.teacher.parameters())
    assert same([p.detach() for p in module.teacher.parameters()], before)
    in_optimizers = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not in_optimizers & {id(p) for p in module.teacher.parameters()}
    assert {id(p) for p in module.critic.head.parameters()} <= in_optimizers
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert ckpt["avgen"]["student"]["steps"] == 4
    module.on_load_checkpoint(ckpt)  # puts the teacher back so a strict load finds every key
    assert set(ckpt["state_dict"]) == set(module.state_dict())


def test_nan_teacher_skips_generator_updates_then_stops_naming_the_loss():
    module = make_module(critic_steps_per_generator_step=1, max_nonfinite_in_a_row=100)
    with torch.no_grad():
        module.teacher.heads["video"].proj.bias.fill_(float("nan"))
    initial = [p.detach().clone() for p in module.student.parameters()]
    rec, trainer = fit(module, 3)
    assert module.nonfinite == {"generator": 3, "critic": 0}
    assert same(rec.after[-1][0], initial)  # the student never moved
    assert not same(rec.after[-1][2], rec.after[0][2])  # the critic trained on

    module = make_module(critic_steps_per_generator_step=1, max_nonfinite_in_a_row=2)
    with torch.no_grad():
        module.teacher.heads["video"].proj.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"dm_loss NaN/inf at step 1: 2 generator updates in a row"):
        fit(module, 5)

    # The counts travel in checkpoints: a streak cut by a resume goes on counting.
    module = make_module(critic_steps_per_generator_step=1, max_nonfinite_in_a_row=3)
    module.nonfinite, module._in_a_row = {"generator": 5, "critic": 1}, {"generator": 2, "critic": 0}
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    resumed = make_module(critic_steps_per_generator_step=1, max_nonfinite_in_a_row=3)
    resumed.on_load_checkpoint(ckpt)
    assert resumed.nonfinite == {"generator": 5, "critic": 1} and resumed._in_a_row == {"generator": 2, "critic": 0}


def test_gan_logits_alone_come_from_a_forward_that_stops_at_the_gan_layer():
    """The GAN terms that need no velocity (real data; the generator's) stop the critic after block
    gan_layer: the same logits and input gradients as the whole forward, without the later blocks."""
    module = make_module()
    critic = module.critic
    assert critic.gan_layer < critic.args.n_layers - 1  # there are blocks to skip
    batch = fixed_batch()
    xs = [module.codec.encode_video(batch["video"]), module.codec.encode_audio(batch["audio"])]
    t = torch.tensor([0.3, 0.8])[: xs[0].shape[0]]
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(critic.net.blocks)]
    grads, logits = [], []
    for velocities in (True, False):
        ran.clear()
        x = [v.clone().requires_grad_(True) for v in xs]
        preds, out = module.critic_features(x, t, batch["caption"], velocities=velocities)
        out.sum().backward()
        assert (preds is None) == (not velocities)
        assert ran == list(range(critic.args.n_layers if velocities else critic.gan_layer + 1))
        logits.append(out.detach())
        grads.append([v.grad for v in x])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    for g_stop, g_full in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_stop, g_full, rtol=1e-6, atol=1e-7)
    assert grads[0][0].abs().sum() > 0


def test_nan_critic_skips_its_updates_leaving_weights_and_optimizer_untouched():
    """A NaN critic loss: the critic's step runs without gradients (AdamW skips them, state
    included), so the iteration counts and nothing in the critic moves; then the run stops."""
    module = make_module(critic_steps_per_generator_step=1, max_nonfinite_in_a_row=100)
    with torch.no_grad():  # the critic's velocity head: its flow-matching loss (and the DM loss) turn NaN
        module.critic.net.heads["video"].proj.bias.fill_(float("nan"))
    initial = [p.detach().clone() for p in module.critic.parameters()]
    _, trainer = fit(module, 3)
    assert trainer.global_step == 3
    assert module.nonfinite == {"generator": 3, "critic": 3}
    for p, p0 in zip(module.critic.parameters(), initial):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0, equal_nan=True)
    assert not trainer.optimizers[1].state  # no Adam moments were ever made

    module = make_module(critic_steps_per_generator_step=5, max_nonfinite_in_a_row=2)
    with torch.no_grad():
        module.critic.net.heads["video"].proj.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"critic_loss NaN/inf at step 1: 2 critic updates in a row"):
        fit(module, 5)


def test_trimmed_captions_give_the_networks_the_same_outputs():
    """trim_text in distillation: the critic's velocities and GAN logits (pooled over the
    generated tokens only, whose positions move when the text is cut) and the guided teacher's
    velocity (cond and uncond then run apart) are the padded, masked batch's."""
    from train.sampling import Guidance

    batch, captions, t = fixed_batch(), ["a tone", "a low hum"], torch.tensor([0.3, 0.8])
    outs = {}
    for trim in (False, True):
        module = make_module(trim_text=trim)
        xs = [module.codec.encode_video(batch["video"]), module.codec.encode_audio(batch["audio"])]
        with torch.no_grad():
            velocities, logits = module.critic_features(xs, t, captions)
            teacher = module.velocity(module.teacher, captions, Guidance(3.0, 2.0))(xs, t)
        outs[trim] = [*velocities, logits, *teacher]
    for got, want in zip(outs[True], outs[False]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert outs[True][-2].abs().max() > 1e-2  # the teacher's guided velocity is not trivially zero


def test_clip_folded_into_fused_adamw_trains_as_clipping_the_gradients(monkeypatch):
    """Both networks' clips go into fused AdamW's steps (train/clipping.py) on a GPU: the same
    weights as clipping the gradients first with the unfused optimizer, not those without a clip."""
    import train.distill

    plain_adamw, plain_release = train.distill.adamw, train.distill.release

    def weights_after(fused: bool, clip: float):
        folded = []  # per network step: was the clip handed to the step (grad_scale set) when released?

        def release(optimizer):
            folded.append(hasattr(optimizer, "grad_scale"))
            plain_release(optimizer)

        monkeypatch.setattr(train.distill, "adamw", lambda params, optim, *_, **__: plain_adamw(params, optim, fused))
        monkeypatch.setattr(train.distill, "release", release)
        module = make_module(critic_steps_per_generator_step=1, grad_clip=clip)
        _, trainer = fit(module, 3)
        assert folded == [fused and clip > 0] * 6  # the student's and the critic's step each iteration
        assert not any(hasattr(opt, "grad_scale") for opt in trainer.optimizers)  # released after each step
        return [p.detach().clone() for net in (module.student, module.critic) for p in net.parameters()]

    folded, clipped, unclipped = weights_after(True, 1e-3), weights_after(False, 1e-3), weights_after(True, 0.0)
    for f, c in zip(folded, clipped):
        torch.testing.assert_close(f, c, rtol=1e-5, atol=1e-6)
    assert max((f - u).abs().max().item() for f, u in zip(folded, unclipped)) > 1e-5


def test_student_video_window_is_the_students_alone_and_it_trains_with_it():
    """distill.student_video_window: the student generates (and learns) through windowed
    attention (model/window.py), teacher and critic stay dense; the first iteration, a generator
    update, moves the student differently from a dense student's."""
    from model.window import VideoWindow

    module = make_module(student_video_window=[1])
    assert module.student.video_window == VideoWindow(t=1)
    assert module.critic.net.video_window is None and module.teacher.video_window is None
    before = [p.detach().clone() for p in module.student.parameters()]
    windowed = fit(module, 1)[0].after[0][0]
    dense = fit(make_module(), 1)[0].after[0][0]
    assert not same(windowed, before) and not same(windowed, dense)


def test_student_timesteps_start_at_one_and_decrease():
    assert DistillConfig(student_steps=3, student_timesteps=[1, 0.6, 0.2]).student_timesteps == [1.0, 0.6, 0.2]
    for bad in ([0.95, 0.6, 0.2], [1.0, 0.2, 0.6], [1.0, 0.6], [1.0, 0.6, 0.0]):
        with pytest.raises(ConfigError, match=r"distill.student_timesteps=.*the first 1.0 \(the student starts from pure noise"):
            DistillConfig(student_steps=3, student_timesteps=bad)
