"""Callbacks of the training stages: periodic samples (mp4 with audio, EMA weights, fixed prompts
and seeds) logged to W&B, the safetensors export at the end, and RNG state in checkpoints."""

import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from train.checkpoint import export_safetensors, prune_checkpoints
from train.config import SampleConfig
from train.distributed import gather_per_rank, own_entry
from train.media import write_av_mp4
from train.preemption import saved_on_signal, was_preempted
from train.sampling import ClipSpec, Guidance, generate
from train.strategy import is_partitioned


def write_samples(
    model,
    codec,
    meta: dict,
    sample: SampleConfig,
    out_dir: Path,
    tag: str,
    steps: int | None = None,
    guidance: Guidance | None = None,
    ema=None,
    student: dict | None = None,
) -> list[Path]:
    """Generate one clip per (prompt, seed), with the EMA weights when given; write mp4 + json
    into out_dir (None: generate only, for the ranks that must join ZeRO-3's collectives).
    student: a distilled student's sampler settings (sampling.generate); default: Euler + CFG."""
    data = meta["data"]
    spec = ClipSpec.from_seconds(sample.seconds, data["fps"], sample.height, sample.width, data["sample_rate"])
    steps = steps or sample.steps
    if guidance is None:
        guidance = Guidance(sample.cfg, sample.cfg if sample.cfg_audio is None else sample.cfg_audio)
    was_training = model.training
    model.eval()
    paths = []
    try:
        with ema.swapped_in() if ema is not None else nullcontext():
            for prompt, seed in zip(sample.prompts, sample.seeds):
                start = time.perf_counter()
                video, audio = generate(
                    model, codec, [prompt], [seed], spec, steps, guidance, meta["text_len"],
                    flow_shift_args=meta["shift_args"], student=student,
                )
                seconds = time.perf_counter() - start
                if out_dir is None:
                    continue
                path = out_dir / f"{tag}_seed{seed}.mp4"
                write_av_mp4(path, video[0], spec.fps, audio[0] if audio is not None else None, spec.sample_rate)
                nfe = steps * (2 if guidance.active else 1)
                info = {"prompt": prompt, "seed": seed, "steps": steps, "cfg_video": guidance.video, "cfg_audio": guidance.audio,
                        "network_evaluations": nfe, "sampler": "student" if student else "euler", "seconds": seconds}
                path.with_suffix(".json").write_text(json.dumps(info, indent=1))
                paths.append(path)
    finally:
        model.train(was_training)
    return paths


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint as the stages use it: a checkpoint every `every_n_steps` and
    last.ckpt, keeping the newest `keep` periodic ones (0: all). Kept by what is on disk
    (train/checkpoint.prune_checkpoints), not by Lightning's top-k state, whose key in a
    checkpoint changes with its monitor settings: checkpoints of an earlier start of the run, or
    written under another keep_checkpoints, are pruned too."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep: int):
        # No version counter: a checkpoint saved again under its name replaces it (whole or not at
        # all, train/checkpoint.py), never a second `last-v1.ckpt` beside a stale `last.ckpt`
        # (which a run resumed from a signal's save, unknown to this callback's state, would get).
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_steps, save_last=True, save_top_k=-1,
                         enable_version_counter=False)
        self.keep = keep

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)  # every rank; whole once it returns (train/strategy.py)
        if self.keep and trainer.is_global_zero:
            prune_checkpoints(Path(self.dirpath), self.keep)

    # A signal's save has just written last.ckpt at this step (PreemptionCallback runs first:
    # Lightning puts checkpoint callbacks last). Saving again would write the whole state once or
    # twice more inside the scheduler's warning time.
    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if not saved_on_signal(trainer):
            super().on_train_batch_end(trainer, *args, **kwargs)

    def on_train_end(self, trainer, module) -> None:
        if not saved_on_signal(trainer):
            super().on_train_end(trainer, module)


class SampleCallback(L.Callback):
    """Every `every_n_steps` (and at the end) write samples and log them to W&B as videos. The
    module decides what to sample: `module.write_samples(sample, out_dir, tag)` returns
    {W&B key: mp4 paths, one per prompt}."""

    def __init__(self, sample: SampleConfig, out_dir: Path):
        self.sample, self.out_dir = sample, Path(out_dir)
        self._last_step = -1

    def _run(self, trainer, module):
        # Under ZeRO-3 every forward gathers parameters collectively: all ranks sample, rank 0 writes.
        if trainer.global_step == self._last_step or not (trainer.is_global_zero or is_partitioned(module)):
            return
        self._last_step = trainer.global_step
        out_dir = self.out_dir if trainer.is_global_zero else None
        start = time.perf_counter()
        written = module.write_samples(self.sample, out_dir, f"step{trainer.global_step:07d}")
        # Timed in the log: the first samples of a compiled run also compile the sampling graphs.
        n = sum(len(p) for p in written.values())
        rank_zero_info(f"samples at step {trainer.global_step}: {n} clip{'s' * (n != 1)} ({', '.join(written)}) "
                       f"in {time.perf_counter() - start:.1f} s")
        for key, paths in written.items():
            if trainer.is_global_zero:
                log_videos(trainer, paths, self.sample.prompts, key)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        n = self.sample.every_n_steps
        # A preemption (PreemptionCallback, before this one) has saved: the warning time is not for samples.
        if n and trainer.global_step % n == 0 and trainer.global_step > 0 and not was_preempted(trainer):
            self._run(trainer, module)

    def on_train_end(self, trainer, module):
        if not was_preempted(trainer):  # the job is about to be killed: no time for samples
            self._run(trainer, module)


def log_videos(trainer, paths: list[Path], captions: list[str], key: str):
    """Log mp4 files (their audio track included) to every W&B logger of the trainer."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            videos = [wandb.Video(str(p), caption=c, format="mp4") for p, c in zip(paths, captions)]
            logger.experiment.log({key: videos, "trainer/global_step": trainer.global_step})


class ExportCallback(L.Callback):
    """At the end of training: consolidated safetensors of the generator, as the module gives it
    (`module.export_weights()`: EMA weights when kept, else the raw ones)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer, module):
        if was_preempted(trainer):  # not the end of training: the run resumes later
            return
        start = time.perf_counter()
        weights, source = module.export_weights()  # every rank: gathering is collective under ZeRO-3
        if not trainer.is_global_zero:
            return
        export_safetensors(self.path, weights, module.meta, trainer.global_step, source)
        rank_zero_info(f"export: {self.path} ({source} weights, step {trainer.global_step}) in {time.perf_counter() - start:.1f} s")


class RNGStateCallback(L.Callback):
    """Save and restore the global Python/NumPy/torch RNG states of every rank with the checkpoint.
    The training step itself draws from per-step generators; this covers everything else (e.g.
    dropout)."""

    def setup(self, trainer, module, stage):
        self._rank, self._world = trainer.global_rank, trainer.world_size

    def state_dict(self):
        return {"ranks": gather_per_rank(self._local_state())}

    def load_state_dict(self, state):
        if "ranks" not in state:  # single-process checkpoint from before per-rank states
            state = {"ranks": [state]}
        self._load_local(own_entry(state["ranks"], self._rank, self._world, "the RNG state"))

    def _local_state(self):
        # NumPy's key array travels as a tensor: checkpoints are loaded with weights_only=True.
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached], "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _load_local(self, state):
        random.setstate(state["python"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
