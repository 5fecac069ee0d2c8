"""The stages behind `python -m train`: each takes the composed Hydra config, turns it into plain
objects once, and runs. Nothing below this layer reads global config."""

import json
import os
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from train.config import ConfigError, DistillConfig, FlowConfig, OptimConfig, RunConfig, SampleConfig


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


def resolve_precision(precision) -> str:
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    if str(precision) in ("16", "16-mixed", "16-true"):
        # fp16 needs loss scaling: clipping would see scaled gradients, and the distill stage's
        # manual student step bypasses Lightning's scaler.
        raise ConfigError(f"trainer.precision={precision}: fp16 is not supported; use bf16-mixed (GPU) or 32-true")
    return str(precision)


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
    # A checkpoint is a file, or a directory of shards under the ZeRO strategy.
    if resume == "auto":
        from train.checkpoint import written_at

        # The newest checkpoint: normally last.ckpt, but a run killed between writing a periodic
        # checkpoint and last.ckpt has the periodic one newer (or alone).
        found = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=written_at)
        return str(found[-1]) if found else None
    if not Path(resume).exists():
        raise ConfigError(f"resume={resume!r}: no such checkpoint; pass a .ckpt path, 'auto' or null")
    return resume


def run_config(cfg: DictConfig, run_dir: Path) -> RunConfig:
    from train.float8 import check_float8

    run_fields = {f.name for f in fields(RunConfig)} - {"run_dir"}
    run = to_object(RunConfig, OmegaConf.create({"run_dir": str(run_dir), **{k: cfg[k] for k in run_fields if k in cfg}}), "run")
    # float8 against the device the run will train on, before any data, model or process group
    on_gpu = trains_on_gpu(cfg)
    if not on_gpu or torch.cuda.is_available():  # a GPU asked for and absent: Lightning says so
        check_float8(run.float8, torch.device("cuda" if on_gpu else "cpu"))
    return run


def trains_on_gpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def prepare_data(cfg: DictConfig):
    """The rank's loader config; the synthetic set is written first when the config has one."""
    from train.datamodule import prepare_synthetic

    loader_cfg = instantiate(cfg.data.loader)
    if cfg.data.get("synthetic") is not None:
        prepare_synthetic(instantiate(cfg.data.synthetic), loader_cfg)
    return loader_cfg


def check_steps(trainer_cfg, stage: str) -> None:
    """Both stages count in optimizer steps: trainer.max_steps is the LR schedule's length, and a
    step's random draws (noise, timesteps, captions dropped) are seeded by the step."""
    max_steps = int(trainer_cfg.get("max_steps", -1))
    if max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps}: the {stage} stage needs a number of steps >= 1 (the LR schedule's length)")
    if int(trainer_cfg.get("accumulate_grad_batches", 1)) != 1:
        why = ("it steps its optimizers itself" if stage == "distill" else
               "every micro-batch of a step would draw the same noise and timesteps (they are seeded by the step), "
               "and under ZeRO both Lightning and DeepSpeed would divide the loss by the accumulation")
        raise ConfigError(f"trainer.accumulate_grad_batches: the {stage} stage takes 1 ({why}); "
                          "use a larger data.loader.batch_size or more GPUs")


def run_pretrain(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_steps(cfg.trainer, "pretrain")
    flow = to_object(FlowConfig, cfg.flow, "flow")
    optim = to_object(OptimConfig, cfg.optimizer, "optimizer")
    sample = to_object(SampleConfig, cfg.sample, "sample")
    run = run_config(cfg, run_dir)

    import lightning as L

    from train.checkpoint import describe
    from train.pretrain import PretrainModule

    loader_cfg = prepare_data(cfg)
    codec = instantiate(cfg.codec)
    model_cfg = fill_model_from_codec(cfg.model, codec, loader_cfg.fps, loader_cfg.sample_rate)

    with torch.device("meta"):  # for the checks and the description: the module builds the model
        probe = instantiate(model_cfg)
    check_cluster(cfg, probe, codec, loader_cfg, flow.text_len, run)
    set_cpu_threads(loader_cfg.num_workers)
    L.seed_everything(run.seed, workers=True, verbose=False)
    args = probe.args
    meta = describe(args, codec, loader_cfg.fps, loader_cfg.sample_rate, loader_cfg.audio_channels, flow.text_len, flow.shift_args)
    module = PretrainModule(args, codec, flow, optim, run, meta)
    fit(cfg, module, run, sample, loader_cfg, trainer_overrides={})


def check_cluster(cfg: DictConfig, probe, codec, loader_cfg, text_len: int, run: RunConfig, distill: DistillConfig | None = None) -> None:
    """The cluster preset against this machine and the model, before any process group exists:
    GPUs, launcher variables, parameter sizes DeepSpeed can align, and the memory per GPU
    estimated from `probe`, a meta-device copy of the network (distill: the distill stage's
    settings, which train two such networks next to the teacher, or None for pretraining)."""
    from model import count_parameters
    from train.cluster import ClusterConfig, check_launch, check_memory, check_zero_parameter_alignment, world_size
    from train.memory import TrainingSetup, estimate_distill_per_gpu, estimate_per_gpu
    from train.sequence import tokens_per_sample
    from train.strategy import StrategyConfig

    cluster = to_object(ClusterConfig, cfg.get("cluster"), "cluster")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision", "auto"))
    check_launch(cluster, trainer_cfg)
    strategy = to_object(StrategyConfig, cfg.strategy, "strategy")
    zero = strategy.name == "zero"
    check_zero_parameter_alignment(probe, strategy.stage if zero else 0, trainer_cfg)
    if cluster.gpu_memory_gb <= 0:
        return
    tokens = loader_cfg.batch_size * max(
        tokens_per_sample(probe.args, codec, loader_cfg.clip_seconds, loader_cfg.fps, loader_cfg.sample_rate, h, w, text_len)
        for _, h, w in loader_cfg.buckets
    )
    setup = TrainingSetup(
        count_parameters(probe), probe.args.n_layers, probe.args.dim, tokens, strategy.stage if zero else 0, world_size(trainer_cfg),
        trainer_cfg["precision"], ema=run.ema_decay > 0,
        activation_checkpointing=run.activation_checkpointing == "full",  # selective keeps ~all: counted as none
        offload_optimizer=zero and strategy.offload_optimizer, offload_parameters=zero and strategy.offload_parameters,
    )
    billions = f"{setup.n_params / 1e9:.2f}B parameters"
    if distill is None:
        est, what = estimate_per_gpu(setup), billions
    else:
        est, what = estimate_distill_per_gpu(setup, distill.teacher_partitioned), f"student + critic + teacher of {billions} each"
    check_memory(cluster, est, what, setup.zero_stage, tokens, trainer_cfg)


def fit(cfg: DictConfig, module, run: RunConfig, sample: SampleConfig, loader_cfg, trainer_overrides: dict,
        per_network: dict | None = None) -> None:
    """The part every training stage shares: loggers, checkpoints every n steps + last, periodic
    samples, RNG state, the export at the end; resume from run.resume. per_network: the module
    trains several networks (build_strategy: one DeepSpeed engine each under ZeRO)."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from train.callbacks import ExportCallback, PeriodicCheckpoint, RNGStateCallback, SampleCallback
    from train.checkpoint import SameDirectoryCheckpointIO
    from train.cluster import world_size
    from train.datamodule import AVDataModule
    from train.parallelize import attention_backends
    from train.preemption import PreemptionCallback
    from train.strategy import StrategyConfig, build_strategy, check_resume_layout
    from train.throughput import ThroughputCallback
    from train.wandb_run import build_loggers

    run_dir = Path(run.run_dir)
    ckpt_path = resolve_resume(run.resume, run_dir)
    loggers = build_loggers(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), resuming=ckpt_path is not None)
    callbacks = [
        # First: a logging step's clock stops before the samples/checkpoints below run.
        ThroughputCallback(run.peak_flops),
        # Before the samples: a preempted step saves at once, within the scheduler's warning time.
        PreemptionCallback(run_dir / "checkpoints" / "last.ckpt", marker=run_dir / "preempted"),
        PeriodicCheckpoint(run_dir / "checkpoints", run.checkpoint_every_n_steps, run.keep_checkpoints),
        SampleCallback(sample, run_dir / "samples"),
        RNGStateCallback(),
    ]
    if run.export:
        callbacks.append(ExportCallback(run_dir / "export" / "model.safetensors"))
    trainer_kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), **trainer_overrides}
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs.get("precision", "auto"))
    strategy_cfg = to_object(StrategyConfig, cfg.strategy, "strategy")
    if run.compile and run.activation_checkpointing == "selective" and strategy_cfg.name == "zero" and strategy_cfg.stage == 3:
        raise ConfigError("activation_checkpointing=selective with compile=true under ZeRO-3: the blocks compile inside their "
                          "checkpoint there (train/parallelize.py), where the selective policy cannot see their ops; "
                          "use activation_checkpointing=full, or compile=false")
    if ckpt_path is not None:
        check_resume_layout(ckpt_path, strategy_cfg.stage if strategy_cfg.name == "zero" else None, world_size(trainer_kwargs))
    strategy = build_strategy(strategy_cfg, loader_cfg.batch_size, world_size(trainer_kwargs), per_network, compiled_blocks=run.compile)
    # Under SLURM, preemption is PreemptionCallback's (one resume path: checkpoints/last.ckpt).
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    if isinstance(strategy, str):  # single-file checkpoints (ZeRO's directories: train/strategy.py)
        plugins.append(SameDirectoryCheckpointIO())
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            strategy=strategy,
            plugins=plugins or None,
            logger=loggers,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
        )
    except TypeError as e:
        raise ConfigError(f"trainer: {e}; see lightning.Trainer's arguments") from None
    with attention_backends(run.attention_backends):
        trainer.fit(module, datamodule=AVDataModule(loader_cfg), ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        report(run_dir, loggers[0])


def report(run_dir: Path, logger) -> None:
    lines = [f"run directory:  {run_dir}", f"checkpoints:    {run_dir / 'checkpoints'}"]
    export = run_dir / "export" / "model.safetensors"
    if export.is_file():
        lines.append(f"export:         {export}")
    samples = sorted((run_dir / "samples").glob("*.mp4"), key=lambda p: p.stat().st_mtime)
    if samples:
        lines.append(f"last sample:    {samples[-1]}")
    wandb_dir = getattr(getattr(logger, "experiment", None), "dir", None)
    if wandb_dir:
        lines.append(f"W&B run:        {Path(wandb_dir).parent}  (wandb sync it to upload)")
    print("\n".join(lines), flush=True)


def run_sample(cfg: DictConfig) -> None:
    import time

    from model.window import VideoWindow
    from train.checkpoint import load_generator
    from train.float8 import apply_float8
    from train.media import write_av_mp4
    from train.parallelize import attention_backends
    from train.sampling import ClipSpec, Guidance, generate

    if cfg.ckpt in (None, "", "???"):
        raise ConfigError("ckpt is required: ckpt=<run_dir>/export/model.safetensors or a .ckpt")
    window_option = cfg.get("video_window")  # null: the checkpoint's (a student distilled with a window keeps it)
    try:
        window = VideoWindow.parse(window_option)
    except ValueError as e:
        raise ConfigError(f"video_window={window_option}: {e}; e.g. video_window=[3] (+-3 latent frames) or none (dense)") from None
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 weights on a GPU: what the sampler computes in there anyway (train/sampling.py), at
    # half the memory (hh15b: 30 GB instead of 60).
    model, codec, meta, step = load_generator(cfg.ckpt, device, torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    float8 = str(cfg.get("float8", "none"))
    if float8 != "none":
        apply_float8(model, float8, torch.device(device))
    if window_option is not None:
        model.video_window = window
    # Defaults come from the checkpoint: a teacher samples 50 Euler steps with guidance 5, a
    # distilled student its own K steps without guidance (its guidance is baked in).
    student = meta.get("student")
    steps = cfg.steps if cfg.steps is not None else (student["steps"] if student else 50)
    scale = cfg.cfg if cfg.cfg is not None else (1.0 if student else 5.0)
    for key, value in (("steps", steps), ("seed", cfg.seed), ("seconds", cfg.seconds), ("height", cfg.height), ("width", cfg.width)):
        if not isinstance(value, (int, float)) or value <= (0 if key != "seed" else -1):
            raise ConfigError(f"{key}={value!r}: must be a positive number")
    cfg_audio = scale if cfg.cfg_audio is None else cfg.cfg_audio
    guidance = Guidance(float(scale), float(cfg_audio))
    if student and (guidance.active or int(steps) != student["steps"]):
        raise ConfigError(
            f"ckpt={cfg.ckpt!r} is a DMD student distilled for steps={student['steps']} without guidance; "
            f"got steps={steps} cfg={scale} cfg_audio={cfg_audio} (leave them unset)"
        )
    data = meta["data"]
    spec = ClipSpec.from_seconds(float(cfg.seconds), data["fps"], int(cfg.height), int(cfg.width), data["sample_rate"])
    start = time.perf_counter()
    with attention_backends():
        video, audio = generate(
            model, codec, [str(cfg.prompt)], [int(cfg.seed)], spec, int(steps), guidance, meta["text_len"],
            flow_shift_args=meta["shift_args"], student=student,
        )
    seconds = time.perf_counter() - start
    out = write_av_mp4(cfg.out, video[0], spec.fps, audio[0] if audio is not None else None, spec.sample_rate)
    nfe = int(steps) * (2 if guidance.active else 1)
    info = {
        "prompt": str(cfg.prompt), "seed": int(cfg.seed), "steps": int(steps), "sampler": "student" if student else "euler", "cfg_video": guidance.video,
        "cfg_audio": guidance.audio, "network_evaluations": nfe, "float8": float8,
        "video_window": str(model.video_window) if model.video_window else None, "seconds": round(seconds, 3), "device": device,
        "ckpt": str(cfg.ckpt), "ckpt_step": step, "fps": spec.fps, "frames": spec.frames, "sample_rate": spec.sample_rate,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out} ({spec.frames} frames at {spec.fps:g} fps, {spec.audio_samples / spec.sample_rate:g} s of audio) in {seconds:.1f} s", flush=True)


def run_distill(cfg: DictConfig) -> None:
    """DMD-2: student and critic start from the teacher's weights (EMA when the checkpoint has
    them); the architecture, codec, text length and shift come from the teacher's checkpoint."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    distill = to_object(DistillConfig, cfg.distill, "distill")
    optim_student = to_object(OptimConfig, cfg.optimizer_student, "optimizer_student")
    optim_critic = to_object(OptimConfig, cfg.optimizer_critic, "optimizer_critic")
    sample = to_object(SampleConfig, cfg.sample, "sample")
    run = run_config(cfg, run_dir)
    if cfg.teacher in (None, "", "???"):
        raise ConfigError("teacher is required: teacher=<pretrain run_dir>/export/model.safetensors (or a .ckpt)")
    trainer_cfg = cfg.trainer
    check_steps(trainer_cfg, "distill")
    if distill.student_window and run.activation_checkpointing == "selective" and not run.compile and trains_on_gpu(cfg):
        # Selective checkpointing runs an eager block's ops under a dispatch mode that skips
        # FlexAttention's own compilation (pytorch/torchtitan#1631): every score computed.
        raise ConfigError("distill.student_video_window with activation_checkpointing=selective on a GPU needs compile=true "
                          "(uncompiled blocks under selective checkpointing run FlexAttention unfused); or use activation_checkpointing=full")

    import lightning as L

    from model import AVTransformer
    from train.checkpoint import check_fits, load_into, model_args, read_weights
    from train.codec import PatchCodec
    from train.distill import DistillModule

    # Read lazily: the description now, each tensor when a network is filled with it (under ZeRO-3
    # the module builds student, critic and a partitioned teacher itself, each partitioned as it is
    # built, and rank 0 alone reads the tensors).
    zero3 = cfg.strategy.name == "zero" and int(cfg.strategy.get("stage", 2)) == 3
    weights, teacher_meta, teacher_step = read_weights(cfg.teacher, option="teacher", lazy=True)
    if "student" in teacher_meta:
        raise ConfigError(f"teacher={cfg.teacher!r} is a distilled student, not a flow-matching teacher")
    codec = PatchCodec(**teacher_meta["codec"])
    loader_cfg = prepare_data(cfg)
    for key, value in (("fps", loader_cfg.fps), ("sample_rate", loader_cfg.sample_rate)):
        if abs(float(teacher_meta["data"][key]) - float(value)) > 1e-6:
            raise ConfigError(
                f"data.loader.{key}={value} but the teacher was trained at {key}={teacher_meta['data'][key]}; "
                "distill on data at the teacher's rates"
            )
    teacher_args = model_args(teacher_meta)
    if cfg.get("model") is not None:  # an explicit architecture must fit the teacher's weights
        model_cfg = fill_model_from_codec(cfg.model, codec, loader_cfg.fps, loader_cfg.sample_rate)
        with open_dict(model_cfg):  # how the teacher reads captions: not a choice
            model_cfg.text_padding = teacher_args.text_padding
        build = lambda: instantiate(model_cfg)  # noqa: E731
    else:
        build = lambda: AVTransformer(teacher_args)  # noqa: E731
    with torch.device("meta"):
        probe = build()
    check_cluster(cfg, probe, codec, loader_cfg, teacher_meta["text_len"], run, distill)

    set_cpu_threads(loader_cfg.num_workers)
    L.seed_everything(run.seed, workers=True, verbose=False)
    source = f"teacher={str(cfg.teacher)!r}"
    if zero3:
        check_fits(probe, weights, source)  # now, not once the processes are up
        args, student, critic = probe.args, None, None
        teacher = None if distill.teacher_partitioned else build()
    else:
        student, critic, teacher = build(), build(), build()
        args = student.args
    for net in (student, critic, teacher):
        if net is not None:
            load_into(net, weights, source)
    meta = {
        **teacher_meta,
        "model": asdict(args),
        "student": {"steps": distill.student_steps, "timesteps": distill.student_timesteps, "video_window": distill.student_video_window},
        "teacher": {"path": str(Path(cfg.teacher).resolve()), "step": teacher_step},
    }
    module = DistillModule(student, critic, teacher, codec, distill, optim_student, optim_critic, run, meta, teacher_weights=weights)
    # Two Lightning warnings that are expected here: the frozen teacher is in eval mode on purpose,
    # and checkpoints hold the state after the step's updates (what resuming needs).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # Manual optimization: the module clips each network itself (distill.grad_clip); under ZeRO
    # each network's DeepSpeed engine does, one engine per network (train/strategy.py).
    per_network = {"frozen_partitioned": distill.teacher_partitioned, "gradient_clipping": distill.grad_clip}
    fit(cfg, module, run, sample, loader_cfg, trainer_overrides={"gradient_clip_val": None}, per_network=per_network)
