"""DMD-2 distillation of the guided flow-matching teacher into a few-step, guidance-free student,
as a LightningModule. The math is train/dmd.py's; this file wires the three networks to it.

    teacher  frozen (no grad, no optimizer state, eval mode), guided: the real score
    critic   trainable fake score, initialised from the teacher, + the GAN head on its features
    student  trainable K-step generator, initialised from the teacher's (EMA) weights

Every step ("iteration") updates the critic; every `critic_steps_per_generator_step`-th also
updates the student, first (DMD-2's order: the critic then fits the freshly moved student). The
Lightning global step counts iterations: the critic's optimizer is stepped through Lightning
(which counts it) and the student's directly (which does not), so `trainer.max_steps` is the
number of iterations and step s updates the student iff s % n == 0, on resume too.

A step whose loss is NaN/inf changes nothing in the network it would have updated: its gradients
are dropped and, for the critic, the optimizer is stepped with no gradients (torch's AdamW skips
parameters without .grad, state included) so the iteration still counts. Skips are counted and
logged; `max_nonfinite_in_a_row` consecutive ones stop the run naming the loss and the step.

Several processes run under DDP: each manual_backward prepares DDP's reducer for the parameters
its loss reaches (the student's in the generator update, the critic's and the head's in the
critic update; `find_unused_parameters`), so gradients are all-reduced before either optimizer
steps, and stepping the student's optimizer outside Lightning is then the same on every rank.
Under DeepSpeed ZeRO (train/strategy.py PerNetworkZeroStrategy) the student and the critic + GAN
head each have their own engine: backward, clipping and step go through it, and the teacher is
partitioned (ZeRO-3) or replicated (distill.teacher_partitioned).
"""

import math
from collections.abc import Mapping
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from model import AVTransformer
from train.callbacks import write_samples
from train.clipping import clip_gradients, release
from train.codec import PatchCodec
from train.config import DistillConfig, OptimConfig, RunConfig
from train.dmd import (
    GANHead,
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
)
from train.ema import EMA
from train.float8 import apply_float8
from train.flow import add_noise, shift_for_tokens
from train.metrics import host_scalar, loggable
from train.parallelize import apply_activation_checkpointing, apply_compile
from train.checkpoint import export_weights, load_into, model_args
from train.pretrain import adamw, build_model, lr_factor, step_generator
from train.sampling import Guidance, make_velocity_fn, student_schedule
from train.sequence import build_sequence, segment_timesteps, sequence_length
from train.strategy import PerNetworkZeroStrategy, is_partitioned, optimizer_offloaded, outside_zero_init, parameter_counts

NAMES = ("video", "audio")  # order of the latents in a sample, as build_sequence emits them


class NonFiniteLossError(RuntimeError):
    """Too many consecutive NaN/inf losses: the run stops (printed as one line by the CLI)."""


@contextmanager
def capture_output(module: torch.nn.Module):
    """Record the output of `module` during the block: the critic's intermediate tokens."""
    box = {}
    handle = module.register_forward_hook(lambda _m, _args, out: box.__setitem__("out", out))
    try:
        yield box
    finally:
        handle.remove()


class Critic(torch.nn.Module):
    """What the critic update trains, as one module: the fake-score transformer and the GAN head
    reading block `gan_layer`. Called like the transformer; with `head_mask` it also returns the
    head's logits. One module, with the head's logits among its outputs, because under ZeRO it is
    one DeepSpeed engine, and ZeRO-3 needs (a) the engine's root module called, or it never
    gathers the small parameters a block reads outside their own module's forward (the
    modulation offsets), and (b) a gradient reaching the root's outputs whenever one reaches its
    inputs (the GAN term of the generator loss reaches the critic through the head alone)."""

    def __init__(self, net: AVTransformer, head: GANHead, gan_layer: int):
        super().__init__()
        self.net, self.head, self.gan_layer = net, head, gan_layer
        self.args = net.args

    def forward(self, inputs, layout, timesteps, key_mask=None, head_mask=None, velocities=True):
        """head_mask: (B, N) bool, the tokens the head pools over; None: velocities only.
        velocities=False: the logits alone, from a forward that stops after block gan_layer (the
        GAN terms on real data and of the generator need no velocity: half the critic's forward,
        and the activations of the blocks after gan_layer are never made)."""
        if head_mask is None:
            return self.net(inputs, layout, timesteps, key_mask)
        if not velocities:
            tokens = self.net(inputs, layout, timesteps, key_mask, stop_after_block=self.gan_layer)
            return self.head(tokens, head_mask)
        with capture_output(self.net.blocks[self.gan_layer]) as box:
            preds = self.net(inputs, layout, timesteps, key_mask)
        return preds, self.head(box["out"], head_mask)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


class DistillModule(L.LightningModule):
    def __init__(
        self,
        student: AVTransformer | None,
        critic: AVTransformer | None,
        teacher: AVTransformer | None,
        codec: PatchCodec,
        distill: DistillConfig,
        optim_student: OptimConfig,
        optim_critic: OptimConfig,
        run: RunConfig,
        meta: dict,
        teacher_weights: Mapping[str, torch.Tensor] | None = None,
    ):
        """student, critic, teacher: networks holding the teacher's weights; or None, to build
        them in configure_model from meta["model"] and load `teacher_weights` (read lazily): inside
        the strategy's init context, so under ZeRO-3 each is partitioned as it is built
        (deepspeed.zero.Init) and no process holds a whole network."""
        super().__init__()
        self.automatic_optimization = False
        self.codec = codec
        self.cfg, self.optim_student, self.optim_critic, self.run = distill, optim_student, optim_critic, run
        self.meta = meta  # the teacher's description + {"student": {...}}: what `sample` needs
        self.args = model_args(meta)
        self.gan_layer = self.args.n_layers // 2 if distill.gan_layer is None else distill.gan_layer
        if not 0 <= self.gan_layer < self.args.n_layers:
            raise ValueError(f"distill.gan_layer={distill.gan_layer}: the model has blocks 0..{self.args.n_layers - 1}")
        to_build = student is None or critic is None or teacher is None
        if to_build and teacher_weights is None:
            raise ValueError("DistillModule: networks left to build need teacher_weights")
        self._teacher_weights = teacher_weights if to_build else None  # read by configure_model, then dropped
        self.student = self.critic = self.teacher = self.ema = None
        self._set_networks(student, critic, teacher)
        self.text_len = meta["text_len"]
        self.shift_args = tuple(meta["shift_args"])
        self.weights = [distill.video_weight, distill.audio_weight]
        self.nonfinite = {"generator": 0, "critic": 0}  # skipped updates, in total
        self._in_a_row = {"generator": 0, "critic": 0}  # consecutive skipped updates of each network
        self._last_generator_stats = {}
        self._teacher_samples = None  # the teacher is frozen: its samples are made once
        self.samples_in_step = self.tokens_in_step = 0  # read by train/throughput.py

    # ---- the networks, for one DeepSpeed engine each (train/strategy.py) ----------------------
    def deepspeed_networks(self) -> dict:
        """Trained networks -> (module, index of its optimizer in configure_optimizers)."""
        return {"student": (self.student, 0), "critic": (self.critic, 1)}

    def frozen_networks(self) -> dict:
        return {"teacher": self.teacher}

    def _per_network(self):
        """The per-network ZeRO strategy when it runs this module, else None."""
        strategy = self.trainer.strategy
        return strategy if isinstance(strategy, PerNetworkZeroStrategy) else None

    @contextmanager
    def _training(self, name: str):
        """Inside, only network `name` has parameters that want gradients; the other one can still
        pass gradients through to its input (the GAN term reaches the student through the critic)."""
        others = [self.critic] if name == "student" else [self.student]
        for m in others:
            m.requires_grad_(False)
        try:
            yield
        finally:
            for m in others:
                m.requires_grad_(True)

    def _backward(self, loss: torch.Tensor, name: str) -> None:
        zero = self._per_network()
        if zero is not None:
            zero.backward_network(loss, name)
        else:
            self.manual_backward(loss)

    # ---- setup --------------------------------------------------------------------------------
    def _set_networks(self, student, critic, teacher):
        if teacher is not None:
            self.teacher = freeze(teacher)
        if student is None or critic is None:
            return
        self.student = student
        # Sparse attention, if asked, in the student only: it learns to generate with it, against
        # the dense teacher's scores and a dense critic.
        self.student.video_window = self.cfg.student_window
        with torch.random.fork_rng(devices=[]):  # the head's initial weights: from the seed alone
            torch.manual_seed(self.run.seed + 1)
            self.critic = Critic(critic, GANHead(self.args.dim), self.gan_layer)
        self.ema = EMA(student, self.run.ema_decay, self.run.ema_every_n_steps) if self.run.ema_decay > 0 else None

    def _build_networks(self):
        """configure_model: the networks not given, built from the teacher's weights."""
        device = self.trainer.strategy.root_device
        source = f"teacher={self.meta['teacher']['path']!r}"
        names = ["student", "critic"] + (["teacher"] if self.teacher is None else [])
        built = {}
        for name in names:
            built[name] = build_model(self.args, self.run.seed, device)
            load_into(built[name], self._teacher_weights, source)
        self._set_networks(built["student"], built["critic"], built.get("teacher"))
        self._teacher_weights = None
        whole, held = parameter_counts(self.student)
        rank_zero_info(f"networks built on {device}: {', '.join(names)}; the student has {whole:,} parameters, {held:,} of them held by this rank")

    def configure_model(self):
        if self.student is None:
            self._build_networks()
        with outside_zero_init():
            if self.run.float8 != "none":  # before checkpointing and compile: they wrap what it swaps in
                for name, net in (("student", self.student), ("critic", self.critic.net), ("teacher", self.teacher)):
                    rank_zero_info(f"{name}: {apply_float8(net, self.run.float8, self.trainer.strategy.root_device)}")
            for net in (self.student, self.critic.net):  # the teacher has no backward: nothing to keep
                apply_activation_checkpointing(net, self.run.activation_checkpointing)
            if self.run.compile:
                for name, net in (("student", self.student), ("critic", self.critic.net), ("teacher", self.teacher)):
                    if name == "critic" and is_partitioned(net):
                        # Compiled blocks are ZeRO-3 leaf modules (train/parallelize.py), whose
                        # gradients DeepSpeed reduces once per call of the block; the critic update
                        # calls each critic block twice (fakes, then real clips) in one backward.
                        rank_zero_info("compile: the critic runs eager under ZeRO-3 (student and teacher compiled)")
                        continue
                    rank_zero_info(f"compile: {name}: {apply_compile(net)}")

    def on_fit_start(self):
        if self.ema is not None:
            self.ema.bind(self.device)

    def train(self, mode: bool = True):
        # Lightning puts the whole module in train mode each epoch; the teacher stays in eval.
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def configure_optimizers(self):
        fused, offloaded = self.device.type == "cuda", optimizer_offloaded(self.trainer.strategy)
        critic_params = list(self.critic.named_parameters())  # the transformer and the GAN head
        return [adamw(self.student.named_parameters(), self.optim_student, fused, offloaded),
                adamw(critic_params, self.optim_critic, fused, offloaded)]

    # ---- the networks as train/dmd.py callables -----------------------------------------------
    def velocity(self, net: AVTransformer, captions, guidance: Guidance = Guidance()):
        return make_velocity_fn(net, captions, self.text_len, guidance, trim_text=self.run.trim_text)

    def critic_features(self, xs, t, captions, velocities: bool = True):
        """One critic forward: (velocities [video, audio] or None, GAN-head logits). The head reads
        the tokens of block gan_layer, pooled over the generated (video + audio) tokens only;
        velocities=False stops the forward there."""
        seq = build_sequence(self.critic.args, captions, self.text_len, xs[0], xs[1], trim_text=self.run.trim_text)
        generated = seq.layout.expand(torch.stack([t.new_full(t.shape, s.role == "generate") for s in seq.layout.segments], 1)).bool()
        inputs = (seq.inputs, seq.layout, segment_timesteps(seq, t), seq.key_mask)
        if not velocities:
            return None, self.critic(*inputs, head_mask=generated, velocities=False)
        preds, logits = self.critic(*inputs, head_mask=generated)
        return [preds[i] for i in sorted(seq.targets)], logits

    def student_timesteps(self, n_tokens: int) -> torch.Tensor:
        return student_schedule(self.meta["student"], shift_for_tokens(n_tokens, *self.shift_args))

    # ---- the step -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        opt_student, opt_critic = self.optimizers()
        step, rank, cfg = self.global_step, self.global_rank, self.cfg
        g = step_generator(self.run.seed, step, rank)
        # The exit step is drawn without the rank: every rank runs the same number of forwards.
        exit_index = random_exit_index(cfg.student_steps, step_generator(self.run.seed, step, None))
        self._set_lrs(opt_student, opt_critic, step)

        with torch.no_grad():
            real = [self.codec.encode_video(batch["video"]), self.codec.encode_audio(batch["audio"])]
        captions = list(batch["caption"])
        B = real[0].shape[0]
        n_tokens = sequence_length(self.student.args, self.text_len, real[0].shape[1:], real[1].shape[1:])
        self.samples_in_step, self.tokens_in_step = B, B * n_tokens
        shift = shift_for_tokens(n_tokens, *self.shift_args)
        timesteps = self.student_timesteps(n_tokens)
        student_v = self.velocity(self.student, captions)
        noise = noise_like(real, g)

        generator_step = is_generator_step(step, cfg.critic_steps_per_generator_step)
        if generator_step:
            fake = student_generate_at(student_v, noise, timesteps, exit_index, g)
            self._generator_update(opt_student, fake, captions, shift, g)
        else:
            with torch.no_grad():
                fake = student_generate_at(student_v, noise, timesteps, exit_index, g)
        self._critic_update(opt_critic, [x.detach() for x in fake], real, captions, shift, g)

        self.log("distill/exit_index", host_scalar(exit_index))
        self.log("distill/generator_step", host_scalar(generator_step))
        for name, value in self._last_generator_stats.items():  # values of the last generator step
            self.log(f"distill/{name}", loggable(value))
        for name, count in self.nonfinite.items():
            self.log(f"distill/skipped_{name}", host_scalar(count))
        skips = getattr(self.trainer.datamodule, "skip_counts", None) if self.trainer.datamodule else None
        for reason, count in (skips() if skips else {}).items():
            self.log(f"data/skipped_{reason}", host_scalar(count))

    def _generator_update(self, opt, fake, captions, shift, g):
        cfg, B = self.cfg, fake[0].shape[0]
        t = dm_timesteps(B, cfg.dm_t_min, cfg.dm_t_max, shift, g, self.device)
        real_v = self.velocity(self.teacher, captions, Guidance(*cfg.guidance))
        fake_v = self.velocity(self.critic, captions)
        zero = self._per_network()
        with self._training("student"):  # critic and head: requires_grad off, the GAN term reaches only x
            dm, stats = dm_generator_loss(fake, real_v, fake_v, t, noise_like(fake, g), self.weights, NAMES)
            losses = {"dm_loss": dm}
            if cfg.gan_generator_weight > 0:
                t_gan = dm_timesteps(B, cfg.dm_t_min, cfg.dm_t_max, shift, g, self.device)
                noised = [add_noise(x, e, t_gan) for x, e in zip(fake, noise_like(fake, g))]
                losses["gan_generator"] = gan_generator_loss(self.critic_features(noised, t_gan, captions, velocities=False)[1])
            total = dm + cfg.gan_generator_weight * losses.get("gan_generator", 0.0)
            stats = {**stats, **{k: v.detach() for k, v in losses.items()}}
            if self._all_finite("generator", losses):
                self._backward(total, "student")
                if zero is not None:  # the engine clips and steps
                    zero.step_network("student")
                    stats["grad_norm/student"] = zero.grad_norm("student")
                    stats["skipped_steps/student"] = host_scalar(zero.skipped_steps("student"))
                else:
                    stats["grad_norm/student"] = self._clip(opt.optimizer, self.student.parameters())
                    opt.optimizer.step()  # the raw optimizer: Lightning counts only the critic's steps
                    release(opt.optimizer)
                if self.ema is not None:
                    self.ema.update()
            opt.zero_grad(set_to_none=True)
        self._last_generator_stats = {k: v for k, v in stats.items() if v is not None}

    def _critic_update(self, opt, fake, real, captions, shift, g):
        cfg, B = self.cfg, fake[0].shape[0]
        t = dm_timesteps(B, cfg.dm_t_min, cfg.dm_t_max, shift, g, self.device)
        logits = {}

        def critic_v(xs, tt):  # the flow-matching forward also gives the head's logits on fakes
            v, logits["fake"] = self.critic_features(xs, tt, captions)
            return v

        zero = self._per_network()
        with self._training("critic"):
            fm, stats = critic_loss(fake, critic_v, t, noise_like(fake, g), self.weights, NAMES)
            losses = {"critic_loss": fm}
            if cfg.gan_critic_weight > 0:
                noised_real = [add_noise(x, e, t) for x, e in zip(real, noise_like(real, g))]
                logits["real"] = self.critic_features(noised_real, t, captions, velocities=False)[1]
                losses["gan_critic"] = gan_discriminator_loss(logits["real"], logits["fake"])
                stats.update(gan_accuracy(logits["real"], logits["fake"]))
            total = fm + cfg.gan_critic_weight * losses.get("gan_critic", 0.0)
            finite = self._all_finite("critic", losses)
            if finite:
                self._backward(total, "critic")
                if zero is None:
                    stats["grad_norm/critic"] = self._clip(opt.optimizer, self.critic.parameters())
            else:
                opt.zero_grad(set_to_none=True)  # no .grad: the step below changes nothing
            opt.step()  # through Lightning: counts the iteration (under ZeRO: the critic's engine steps)
            release(opt.optimizer)
            if zero is not None and finite:
                stats["grad_norm/critic"] = zero.grad_norm("critic")
                stats["skipped_steps/critic"] = host_scalar(zero.skipped_steps("critic"))
            opt.zero_grad(set_to_none=True)
        for name, value in {**stats, **losses}.items():
            if value is None:
                continue
            self.log(f"distill/{name}", loggable(value))

    # ---- helpers ------------------------------------------------------------------------------
    def _all_finite(self, network: str, losses: dict) -> bool:
        """True if every loss is finite on every rank (all ranks then skip or step together)."""
        names = list(losses)
        bad = torch.stack([~torch.isfinite(losses[n].detach().float()) for n in names]).float()
        bad = self.trainer.strategy.reduce(bad, reduce_op="sum") if self.trainer.world_size > 1 else bad
        bad_names = [n for n, b in zip(names, bad.tolist()) if b > 0]
        if not bad_names:
            self._in_a_row[network] = 0
            return True
        self.nonfinite[network] += 1
        self._in_a_row[network] += 1
        if self._in_a_row[network] >= self.cfg.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"{' and '.join(bad_names)} NaN/inf at step {self.global_step}: {self._in_a_row[network]} {network} updates "
                f"in a row skipped (distill.max_nonfinite_in_a_row={self.cfg.max_nonfinite_in_a_row}); lower the "
                "learning rates or check the teacher and the data"
            )
        return False

    def _clip(self, optimizer, params) -> torch.Tensor:
        """Clip to distill.grad_clip (0: only measure); with fused AdamW inside the optimizer's next
        step (train/clipping.py). Returns the norm before clipping."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return clip_gradients(optimizer, params, max_norm).detach()

    def _set_lrs(self, opt_student, opt_critic, step: int):
        """Each network's warm-up/decay runs on its own update count (the student's is 1/n of the
        critic's); set from the global step, so a resumed run continues the schedule exactly."""
        n = self.cfg.critic_steps_per_generator_step
        total = max(int(self.trainer.max_steps), 1)
        for opt, o, own_step, own_total in (
            (opt_student, self.optim_student, generator_steps_before(step, n), generator_steps_before(total, n)),
            (opt_critic, self.optim_critic, step, total),
        ):
            lr = o.lr * lr_factor(own_step, o, o.total_steps or own_total)
            for group in opt.param_groups:
                group["lr"] = lr
        self.log("distill/lr_student", host_scalar(opt_student.param_groups[0]["lr"]))
        self.log("distill/lr_critic", host_scalar(opt_critic.param_groups[0]["lr"]))

    # ---- samples and export (train/callbacks.py) ----------------------------------------------
    def write_samples(self, sample, out_dir, tag) -> dict:
        """The student (K steps, no guidance, EMA weights) and, once, the teacher (sample.steps
        with sample.cfg) for the same prompts and seeds, logged side by side."""
        student = write_samples(
            self.student, self.codec, self.meta, sample, out_dir, tag, steps=self.cfg.student_steps,
            guidance=Guidance(), ema=self.ema, student=self.meta["student"],
        )
        if self._teacher_samples is None:
            self._teacher_samples = write_samples(self.teacher, self.codec, self.meta, sample, out_dir, "teacher")
        return {"samples/student": student, "samples/teacher": self._teacher_samples}

    def export_weights(self) -> tuple[dict, str]:
        return export_weights(self.student, self.ema, self.global_rank == 0)

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        # The frozen teacher is not saved with every checkpoint (a second copy of the model); it is
        # reloaded from meta["teacher"]["path"] and put back in on_load_checkpoint.
        if "state_dict" in checkpoint:  # (under ZeRO each engine saves its own network instead)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["avgen"] = self.meta
        checkpoint["distill_skips"] = dict(self.nonfinite)
        checkpoint["distill_skips_in_a_row"] = dict(self._in_a_row)  # a streak goes on across a resume
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint):
        if "state_dict" in checkpoint:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        self.nonfinite.update(checkpoint.get("distill_skips", {}))
        self._in_a_row.update(checkpoint.get("distill_skips_in_a_row", {}))
