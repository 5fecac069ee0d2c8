"""The stages behind `python -m train`: each takes the composed Hydra config, turns it into plain
objects once, and runs. Nothing below this layer reads global config."""

import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, FlowConfig, OptimConfig, RunConfig, SampleConfig


def to_object(cls, section: DictConfig | None, name: str):
    """A config section -> dataclass, with OmegaConf's type checks (a wrong type names the key)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        # Resolve interpolations while the section still hangs in the full config.
        values = OmegaConf.to_container(section, resolve=True) if section is not None else {}
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        message = str(e).splitlines()[0]
        raise ConfigError(f"{name}.{key}: {message}") from None


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return precision


def fill_model_from_codec(model_cfg: DictConfig, codec, fps: float, sample_rate: int) -> DictConfig:
    """The latent interface of the model is fixed by the codec and data rates; presets leave those
    fields null to take them from here, and an explicit value must agree."""
    derived = {
        "video_channels": codec.video_latent_channels,
        "audio_channels": codec.audio_latent_channels,
        "audio_latents_per_video_frame": codec.audio_latents_per_video_frame(fps, sample_rate),
    }
    model_cfg = model_cfg.copy()
    for key, value in derived.items():
        current = model_cfg.get(key)
        if current is None:
            model_cfg[key] = value
        elif abs(float(current) - float(value)) > 1e-6:
            raise ConfigError(
                f"model.{key}={current} but the codec and data give {value:g}; set model.{key}=null to take it from the codec"
            )
    return model_cfg


def set_cpu_threads(data_workers: int) -> None:
    """On CPU, leave one core per data worker: torch's OpenMP threads spin at every parallel op
    until all of them arrive, so one thread sharing a core with a decoding worker made each op
    wait for the scheduler (seen on the 2-core CI machine: the demo's tiny step went from
    seconds to a fraction of a second with one thread fewer). OMP_NUM_THREADS, when set, wins."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - data_workers))


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise ConfigError(f"resume={resume!r}: no such checkpoint; pass a .ckpt path, 'auto' or null")
    return resume


def run_pretrain(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    flow = to_object(FlowConfig, cfg.flow, "flow")
    optim = to_object(OptimConfig, cfg.optimizer, "optimizer")
    sample = to_object(SampleConfig, cfg.sample, "sample")
    run_fields = {f.name for f in fields(RunConfig)} - {"run_dir"}
    run = to_object(RunConfig, OmegaConf.create({"run_dir": str(run_dir), **{k: cfg[k] for k in run_fields if k in cfg}}), "run")

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from train.callbacks import ExportCallback, RNGStateCallback, SampleCallback
    from train.checkpoint import describe
    from train.datamodule import AVDataModule, prepare_synthetic
    from train.pretrain import PretrainModule
    from train.wandb_run import build_loggers

    loader_cfg = instantiate(cfg.data.loader)
    if cfg.data.get("synthetic") is not None:
        prepare_synthetic(instantiate(cfg.data.synthetic), loader_cfg)
    codec = instantiate(cfg.codec)
    model_cfg = fill_model_from_codec(cfg.model, codec, loader_cfg.fps, loader_cfg.sample_rate)

    set_cpu_threads(loader_cfg.num_workers)
    L.seed_everything(run.seed, workers=True, verbose=False)
    model = instantiate(model_cfg)
    meta = describe(model, codec, loader_cfg.fps, loader_cfg.sample_rate, loader_cfg.audio_channels, flow.text_len, flow.shift_args)
    module = PretrainModule(model, codec, flow, optim, run, meta)

    ckpt_path = resolve_resume(run.resume, run_dir)
    loggers = build_loggers(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), resuming=ckpt_path is not None)
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=run.checkpoint_every_n_steps, save_last=True, save_top_k=-1),
        SampleCallback(sample, run_dir / "samples"),
        RNGStateCallback(),
    ]
    if run.export:
        callbacks.append(ExportCallback(run_dir / "export" / "model.safetensors"))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs.get("precision", "auto"))
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            strategy=cfg.strategy.name,
            logger=loggers,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
        )
    except TypeError as e:
        raise ConfigError(f"trainer: {e}; see lightning.Trainer's arguments") from None
    trainer.fit(module, datamodule=AVDataModule(loader_cfg), ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        report(run_dir, loggers[0])


def report(run_dir: Path, logger) -> None:
    lines = [f"run directory:  {run_dir}", f"checkpoints:    {run_dir / 'checkpoints'}"]
    export = run_dir / "export" / "model.safetensors"
    if export.is_file():
        lines.append(f"export:         {export}")
    samples = sorted((run_dir / "samples").glob("*.mp4"))
    if samples:
        lines.append(f"last sample:    {samples[-1]}")
    wandb_dir = getattr(getattr(logger, "experiment", None), "dir", None)
    if wandb_dir:
        lines.append(f"W&B run:        {Path(wandb_dir).parent}  (wandb sync it to upload)")
    print("\n".join(lines), flush=True)


def run_sample(cfg: DictConfig) -> None:
    import time

    from train.checkpoint import load_generator
    from train.media import write_av_mp4
    from train.sampling import ClipSpec, Guidance, generate

    if cfg.ckpt in (None, "", "???"):
        raise ConfigError("ckpt is required: ckpt=<run_dir>/export/model.safetensors or a .ckpt")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, codec, meta, step = load_generator(cfg.ckpt, device)
    for key in ("steps", "seed", "seconds", "height", "width"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] <= (0 if key != "seed" else -1):
            raise ConfigError(f"{key}={cfg[key]!r}: must be a positive number")
    cfg_audio = cfg.cfg if cfg.cfg_audio is None else cfg.cfg_audio
    guidance = Guidance(float(cfg.cfg), float(cfg_audio))
    data = meta["data"]
    spec = ClipSpec.from_seconds(float(cfg.seconds), data["fps"], int(cfg.height), int(cfg.width), data["sample_rate"])
    start = time.perf_counter()
    video, audio = generate(model, codec, [str(cfg.prompt)], [int(cfg.seed)], spec, int(cfg.steps), guidance, meta["text_len"], flow_shift_args=meta["shift_args"])
    seconds = time.perf_counter() - start
    out = write_av_mp4(cfg.out, video[0], spec.fps, audio[0] if audio is not None else None, spec.sample_rate)
    nfe = int(cfg.steps) * (2 if guidance.active else 1)
    info = {
        "prompt": str(cfg.prompt), "seed": int(cfg.seed), "steps": int(cfg.steps), "cfg_video": guidance.video,
        "cfg_audio": guidance.audio, "network_evaluations": nfe, "seconds": round(seconds, 3), "device": device,
        "ckpt": str(cfg.ckpt), "ckpt_step": step, "fps": spec.fps, "frames": spec.frames, "sample_rate": spec.sample_rate,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out} ({spec.frames} frames at {spec.fps:g} fps, {spec.audio_samples / spec.sample_rate:g} s of audio) in {seconds:.1f} s", flush=True)


def run_distill(cfg: DictConfig) -> None:
    raise ConfigError("the distill stage is not built yet (issue: DMD-2 distillation)")


