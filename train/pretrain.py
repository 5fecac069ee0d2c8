"""Flow-matching pretraining of the joint audio-video transformer, as a LightningModule.

One step: pixels/waveforms -> codec latents -> segment layout -> noise at logit-normal,
resolution-shifted timesteps -> velocity loss per modality. Randomness of a step (timesteps,
noise, caption dropout, task) comes from generators seeded by (seed, step, rank), so a resumed run
draws exactly what the uninterrupted run would have drawn.
"""

import math

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from model import AVTransformer, ModelArgs
from train.callbacks import write_samples
from train.checkpoint import export_weights, model_args
from train.clipping import clip_gradients, release
from train.codec import PatchCodec
from train.config import ConfigError, FlowConfig, OptimConfig, RunConfig
from train.ema import EMA
from train.float8 import apply_float8
from train.flow import add_noise, per_sample_mse, sample_timesteps, shift_for_tokens, velocity_target, weighted_loss
from train.metrics import host_scalar, loggable, progress_bar_on
from train.parallelize import apply_activation_checkpointing, apply_compile
from train.sequence import build_sequence, segment_timesteps, sequence_length
from train.strategy import optimizer_offloaded, outside_zero_init, parameter_counts

T_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def step_generator(seed: int, step: int, rank: int | None, device="cpu", stream: int = 0) -> torch.Generator:
    """The generator of a step's random draws: the rank's own (stream 0 for the host's draws:
    timesteps, caption dropout; stream 1 for the noise, on the device), or with rank=None the
    draws every rank must make alike (the task, the exit step). Its seed hashes (seed, step,
    rank, stream) with numpy's SeedSequence, so no two of these start alike: the shared stream
    is not rank 0's (sample 0's caption dropout would then repeat the task's draw), and on a
    CPU run the noise does not repeat the timesteps' draws."""
    seed = seed & 0xFFFF_FFFF_FFFF_FFFF
    key = [seed, step, 0] if rank is None else [seed, step, 1, rank, stream]
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


def audio_latent_mask(audio_mask: torch.Tensor, hop: int) -> torch.Tensor:
    """(B, S) sample mask -> (B, S/hop) latent-frame mask: a frame counts only if all of it is real."""
    return audio_mask.unflatten(1, (-1, hop)).all(-1)


def build_model(args: ModelArgs, seed: int, device: torch.device) -> AVTransformer:
    """The model with the same initial weights on every rank (drawn from `seed` in a forked RNG,
    whatever the rank drew before), built on the current default device."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        return AVTransformer(args)


class PretrainModule(L.LightningModule):
    def __init__(self, model: AVTransformer | ModelArgs, codec: PatchCodec, flow: FlowConfig, optim: OptimConfig, run: RunConfig, meta: dict):
        """model: a built AVTransformer, or its ModelArgs to build in configure_model, inside the
        strategy's init context: directly on the GPU, and under ZeRO-3 partitioned as each layer is
        built (deepspeed.zero.Init), so no process ever holds the whole 15B model."""
        super().__init__()
        self.model = model if isinstance(model, AVTransformer) else None
        self.model_args = model.args if isinstance(model, AVTransformer) else model
        self.codec = codec
        self.flow, self.optim, self.run = flow, optim, run
        self.meta = meta  # model/codec/data description stored in checkpoints and exports
        self.ema = EMA(model, run.ema_decay, run.ema_every_n_steps) if self.model is not None and run.ema_decay > 0 else None
        self._configured = False
        self.samples_in_step = self.tokens_in_step = 0  # read by train/throughput.py

    # ---- setup --------------------------------------------------------------------------------
    def configure_model(self):
        if self._configured:
            return
        self._configured = True
        if self.model is None:
            self.model = build_model(self.model_args, self.run.seed, self.trainer.strategy.root_device)
            self.ema = EMA(self.model, self.run.ema_decay, self.run.ema_every_n_steps) if self.run.ema_decay > 0 else None
            whole, held = parameter_counts(self.model)
            rank_zero_info(f"model built on {self.trainer.strategy.root_device}: {whole:,} parameters, {held:,} of them held by this rank")
        with outside_zero_init():
            if self.run.float8 != "none":  # before checkpointing and compile: they wrap what it swaps in
                rank_zero_info(apply_float8(self.model, self.run.float8, self.trainer.strategy.root_device))
            apply_activation_checkpointing(self.model, self.run.activation_checkpointing)
            if self.run.compile:
                rank_zero_info(f"compile: {apply_compile(self.model)}")

    def on_fit_start(self):
        if self.ema is not None:
            self.ema.bind(self.device)

    def configure_optimizers(self):
        opt = adamw(self.model.named_parameters(), self.optim, fused=self.device.type == "cuda",
                    offloaded=optimizer_offloaded(self.trainer.strategy))
        total = self.optim.total_steps or max(int(self.trainer.max_steps), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, self.optim, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- the step -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        step, rank = self.global_step, self.global_rank
        g_cpu = step_generator(self.run.seed, step, rank)
        g_dev = step_generator(self.run.seed, step, rank, self.device, stream=1)
        # The task is drawn with the rank left out: every rank builds the same segments (their
        # lengths may differ: the text is trimmed to each rank's captions), so every rank runs
        # the same modules, which ZeRO-3's per-module gathers need.
        g_task = step_generator(self.run.seed, step, None)
        with_audio = bool(torch.rand((), generator=g_task) >= self.flow.no_audio_rate)
        task = "i2v" if bool(torch.rand((), generator=g_task) < self.flow.i2v_rate) else "t2v"

        with torch.no_grad():
            video = self.codec.encode_video(batch["video"])
            audio = self.codec.encode_audio(batch["audio"]) if with_audio else None
        captions = [c if bool(torch.rand((), generator=g_cpu) >= self.flow.caption_dropout) else "" for c in batch["caption"]]
        seq = build_sequence(self.model.args, captions, self.flow.text_len, video, audio, task, trim_text=self.run.trim_text)

        B = video.shape[0]
        # The shift is the untrimmed sequence's, as the sampler takes it: the timesteps must not
        # depend on how long a batch's captions are.
        n_tokens = sequence_length(self.model.args, self.flow.text_len, video.shape[1:], None if audio is None else audio.shape[1:])
        shift = shift_for_tokens(n_tokens, *self.flow.shift_args)
        t_host = sample_timesteps(B, shift, self.flow.logit_mean, self.flow.logit_std, g_cpu)
        t = t_host.to(self.device, non_blocking=True)
        inputs, targets = list(seq.inputs), {}
        for i in seq.targets:
            eps = torch.randn(inputs[i].shape, generator=g_dev, device=self.device, dtype=inputs[i].dtype)
            targets[i] = velocity_target(inputs[i], eps)
            inputs[i] = add_noise(inputs[i], eps, t)
        preds = self.model(inputs, seq.layout, segment_timesteps(seq, t), seq.key_mask)

        losses, per_sample = {}, {}
        for i, modality in seq.targets.items():
            if modality == "audio":
                # Only real audio counts: padding and files without sound are masked out.
                mask = audio_latent_mask(batch["audio_mask"], self.codec.hop).float()
                sq = (preds[i].float() - targets[i].float()).square().mean(1)  # (B, T)
                per_sample[modality] = (sq * mask).sum(1) / mask.sum(1).clamp(min=1)
                losses[modality] = (sq * mask).sum() / mask.sum().clamp(min=1)
            else:
                per_sample[modality] = per_sample_mse(preds[i], targets[i])
                losses[modality] = per_sample[modality].mean()
        loss = weighted_loss(losses, {"video": self.flow.video_weight, "audio": self.flow.audio_weight})

        # tokens/s counts the clip's tokens at the full text length (as distillation does), so it
        # does not move with caption lengths; the FLOP counter counts what the model ran.
        self.samples_in_step, self.tokens_in_step = B, B * n_tokens
        self.log("train/loss", loss, prog_bar=progress_bar_on(self))
        for m, v in losses.items():
            self.log(f"train/loss_{m}", v)
        self.log("train/shift", host_scalar(shift))
        self._log_timestep_buckets(t_host, per_sample)
        return loss

    def _log_timestep_buckets(self, t_host, per_sample):
        """Loss per timestep range. Which samples fall in a range is read from the host copy of
        t, and the mean is a masked sum: no device-to-host sync in the step."""
        per_sample = sum(per_sample.values()).detach()
        for lo, hi in zip(T_BUCKETS[:-1], T_BUCKETS[1:]):
            inside = (t_host >= lo) & (t_host < hi) if hi < 1 else (t_host >= lo)
            count = int(inside.sum())
            if count:
                weights = inside.to(per_sample.device, per_sample.dtype, non_blocking=True)
                self.log(f"train/loss_t{lo:.2f}-{hi:.2f}", (per_sample * weights).sum() / count)

    # ---- around the step ----------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer):
        if self.trainer.gradient_clip_val:
            return  # clipping computes the norm and logs it (configure_gradient_clipping)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        for optimizer in self.trainer.optimizers:
            release(optimizer)  # the clip folded into this step (train/clipping.py)
        # Here, not in on_train_batch_end: callbacks' batch-end hooks (the checkpoint) run before
        # the module's, and a checkpoint must hold the EMA of the weights it holds.
        if self.ema is not None:
            self.ema.update()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Clip here rather than through the precision plugin: Lightning refuses to clip for fused
        # AdamW under mixed precision (it assumes a grad scaler), and bf16 needs no scaler. With
        # fused AdamW (on a GPU) the clip is applied inside its step (train/clipping.py).
        if gradient_clip_val:
            # The norm before clipping, the one the threshold is compared with; logged from here
            # so the gradients are read once for it, not a second time in on_before_optimizer_step.
            self.log("train/grad_norm", clip_gradients(optimizer, self.model.parameters(), gradient_clip_val))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("train/lr", host_scalar(self.trainer.optimizers[0].param_groups[0]["lr"]))
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        grad_norm = engine.get_global_grad_norm() if engine is not None else None
        if grad_norm is not None:  # DeepSpeed keeps gradients in its own buffers (p.grad is None above)
            self.log("train/grad_norm", loggable(grad_norm))
        if engine is not None:  # steps DeepSpeed itself skipped on a gradient overflow (inf/NaN), in total
            self.log("train/skipped_steps", host_scalar(engine.skipped_steps))
        skips = getattr(self.trainer.datamodule, "skip_counts", None) if self.trainer.datamodule else None
        for reason, count in (skips() if skips else {}).items():
            self.log(f"data/skipped_{reason}", host_scalar(count))

    # ---- samples and export (train/callbacks.py) ----------------------------------------------
    def write_samples(self, sample, out_dir, tag) -> dict:
        return {"samples/generator": write_samples(self.model, self.codec, self.meta, sample, out_dir, tag, ema=self.ema)}

    def export_weights(self) -> tuple[dict, str]:
        """Called on every rank (ZeRO-3 gathers collectively); rank 0 gets the weights."""
        return export_weights(self.model, self.ema, self.global_rank == 0)

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["avgen"] = self.meta
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint):
        # A run continues reading captions as it started: runs begun before left padding existed
        # (no text_padding in their description) padded on the right.
        started = model_args(checkpoint["avgen"]).text_padding if "avgen" in checkpoint else self.model_args.text_padding
        if started != self.model_args.text_padding:
            raise ConfigError(
                f"resume: this run was trained on {started}-padded captions but model.text_padding="
                f"{self.model_args.text_padding!r}; resume it with model.text_padding={started}"
            )
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])


def adamw(named_parameters, optim: OptimConfig, fused: bool, offloaded: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: matrices decay; biases, norms, gate logits and all
    of the adaLN modulation (the blocks' offsets and the `to_modulation` projections that make
    it from t) do not: decay pulls a norm's gain or the modulation to 0, and adaLN-Zero's gates
    start there. (Which parameters are in which group is part of every checkpoint's optimizer
    state: changing it stops earlier runs from resuming.)
    offloaded: DeepSpeed steps it on the CPU (strategy.offload_optimizer), where it takes only
    its own vectorised CPU AdamW (built on first use, about a minute); the same update."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            # ds_shape: a parameter built partitioned (ZeRO-3) is an empty 1-D placeholder here
            matrix = len(getattr(p, "ds_shape", p.shape)) >= 2
            (decay if matrix and "modulation" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if offloaded:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused)


def lr_factor(step: int, optim: OptimConfig, total: int) -> float:
    """Linear warm-up, then constant or cosine decay to min_lr_ratio at `total` steps."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
