"""Plain config objects for the training stages. Hydra's DictConfig is turned into these once, at
the entry point; library code only ever sees these dataclasses. Each checks its own ranges and
raises ConfigError naming the option, the value and what is allowed."""

from dataclasses import dataclass, field

from model.window import VideoWindow
from train.float8 import FLOAT8_RECIPES
from train.parallelize import AC_MODES, ATTENTION_BACKENDS, DEFAULT_ATTENTION_ORDER


class ConfigError(ValueError):
    """A user-facing configuration mistake: printed as one line by the entry point."""


def _require(ok: bool, option: str, value, allowed: str):
    if not ok:
        raise ConfigError(f"{option}={value!r}: {allowed}")


@dataclass
class FlowConfig:
    """Flow-matching objective (train/flow.py)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    base_tokens: int = 1024  # sequence length that gets base_shift
    base_shift: float = 1.0
    max_shift: float = 6.0
    video_weight: float = 1.0
    audio_weight: float = 1.0
    caption_dropout: float = 0.1  # captions replaced by "" so the model also learns the unconditional velocity
    text_len: int = 64  # byte tokens per caption (BOS + bytes + EOS, padded)
    i2v_rate: float = 0.0  # fraction of batches trained as image-to-video (first latent frame clean)
    no_audio_rate: float = 0.0  # fraction of batches trained video-only

    def __post_init__(self):
        _require(self.logit_std > 0, "flow.logit_std", self.logit_std, "must be > 0")
        _require(self.base_tokens > 0, "flow.base_tokens", self.base_tokens, "must be > 0")
        _require(0 < self.base_shift <= self.max_shift, "flow.base_shift", self.base_shift, f"must be in (0, max_shift={self.max_shift}]")
        _require(self.video_weight >= 0 and self.audio_weight >= 0, "flow.video_weight/audio_weight", (self.video_weight, self.audio_weight), "must be >= 0")
        for name in ("caption_dropout", "i2v_rate", "no_audio_rate"):
            v = getattr(self, name)
            _require(0.0 <= v <= 1.0, f"flow.{name}", v, "must be in [0, 1]")
        _require(self.text_len >= 2, "flow.text_len", self.text_len, "must be >= 2")

    @property
    def shift_args(self) -> tuple[int, float, float]:
        return self.base_tokens, self.base_shift, self.max_shift


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    total_steps: int = 0  # cosine length; 0: trainer.max_steps
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        _require(self.lr > 0, "optimizer.lr", self.lr, "must be > 0")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas", self.betas, "must be two values in [0, 1)")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.schedule in ("cosine", "constant"), "optimizer.schedule", self.schedule, "choose cosine or constant")
        _require(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


@dataclass
class SampleConfig:
    """Periodic samples during training, and the defaults of `python -m train sample`."""

    every_n_steps: int = 0  # 0: only at the end of training
    prompts: list[str] = field(default_factory=lambda: ["a red circle bounces off the floor with a click"])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 50
    cfg: float = 5.0
    cfg_audio: float | None = None  # None: same as cfg
    seconds: float = 2.0
    height: int = 32
    width: int = 32

    def __post_init__(self):
        self.prompts, self.seeds = list(self.prompts), [int(s) for s in self.seeds]
        _require(self.every_n_steps >= 0, "sample.every_n_steps", self.every_n_steps, "must be >= 0")
        _require(len(self.prompts) == len(self.seeds) and self.prompts, "sample.seeds", self.seeds, f"need one seed per prompt ({len(self.prompts)} prompts)")
        _require(self.steps >= 1, "sample.steps", self.steps, "must be >= 1")
        _require(self.seconds > 0, "sample.seconds", self.seconds, "must be > 0")


@dataclass
class RunConfig:
    """Everything the pretrain stage needs besides the objects Hydra instantiates."""

    run_dir: str
    seed: int = 0
    ema_decay: float = 0.999
    # Fold the weights into the EMA every N optimizer steps (with the decay of the N steps): the
    # EMA's pass over the float32 weights costs ~2.5% of a one-GPU step at every step (train/ema.py).
    ema_every_n_steps: int = 10
    # none | full (recompute each block) | selective (keep matmul/attention outputs, recompute the
    # elementwise ops); true/false mean full/none.
    activation_checkpointing: str = "none"
    # Scaled-dot-product-attention kernels in priority order (train/parallelize.py).
    attention_backends: list[str] = field(default_factory=lambda: list(DEFAULT_ATTENTION_ORDER))
    compile: bool = False
    # FP8 matmuls in the blocks' projections through torchao (train/float8.py): none | tensorwise |
    # rowwise | rowwise_with_gw_hp. Needs FP8 tensor cores (H100); on CPU tensorwise, for tests.
    float8: str = "none"
    # Cut each batch's text segment to its longest caption (exact for left-padded captions,
    # train/sequence.py): a batch of one then needs no attention key mask, which costs cuDNN
    # attention a large part of its speed. Under compile the text length becomes a dynamic size
    # (one recompile, at the first batch whose length differs). Right-padded models ignore it.
    trim_text: bool = True
    checkpoint_every_n_steps: int = 100
    # Periodic checkpoints kept: the newest N (and last.ckpt); 0 keeps them all. A 15B ZeRO
    # checkpoint with optimizer states and EMA is about 270 GB.
    keep_checkpoints: int = 0
    resume: str | None = None  # a .ckpt path, "auto" (last checkpoint in run_dir if any) or None
    export: bool = True  # write export/model.safetensors (EMA weights) at the end
    # Peak FLOP/s of one device for perf/mfu; null: Lightning's table for the GPU and precision
    # (H100 SXM bf16: 989.4e12), no MFU on CPU.
    peak_flops: float | None = None

    def __post_init__(self):
        _require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in [0, 1)")
        _require(self.ema_every_n_steps >= 1, "ema_every_n_steps", self.ema_every_n_steps, "must be >= 1")
        _require(self.checkpoint_every_n_steps >= 1, "checkpoint_every_n_steps", self.checkpoint_every_n_steps, "must be >= 1")
        _require(self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, "must be >= 0 (0 keeps every checkpoint)")
        ac = {"true": "full", "false": "none"}.get(str(self.activation_checkpointing).lower(), self.activation_checkpointing)
        _require(ac in AC_MODES, "activation_checkpointing", self.activation_checkpointing, f"choose from {', '.join(AC_MODES)}")
        self.activation_checkpointing = ac
        bad = [b for b in self.attention_backends if b not in ATTENTION_BACKENDS]
        _require(bool(self.attention_backends) and not bad, "attention_backends", list(self.attention_backends),
                 f"a non-empty list from {', '.join(ATTENTION_BACKENDS)}")
        self.attention_backends = list(self.attention_backends)
        _require(self.float8 in FLOAT8_RECIPES, "float8", self.float8, f"choose from {', '.join(FLOAT8_RECIPES)}")
        _require(self.peak_flops is None or self.peak_flops > 0, "peak_flops", self.peak_flops, "must be > 0 FLOP/s, or null")


@dataclass
class DistillConfig:
    """DMD-2 distillation (train/dmd.py, train/distill.py)."""

    student_steps: int = 8
    # The student's K timesteps (from 1 down, the final 0 is implied); null: the teacher's shifted
    # schedule for the clip's token count, sampling_schedule(K, shift), as at inference.
    student_timesteps: list[float] | None = None
    critic_steps_per_generator_step: int = 5  # two time-scale update rule (DMD-2 sec. 4.2)
    dm_t_min: float = 0.02  # noise levels of the DM / critic / GAN losses
    dm_t_max: float = 0.98
    cfg: float = 5.0  # the teacher's guidance in the real score (video)
    cfg_audio: float | None = None  # None: same as cfg
    video_weight: float = 1.0  # per-modality weights of the DM and critic losses
    audio_weight: float = 1.0
    gan_generator_weight: float = 3e-3  # DMD-2's weights of the GAN terms (ImageNet setting)
    gan_critic_weight: float = 1e-2
    gan_layer: int | None = None  # critic block whose output feeds the GAN head; None: the middle one
    grad_clip: float = 1.0  # per network; 0 disables
    # Under ZeRO-3: the frozen teacher partitioned like the trained networks (true), or a whole
    # copy in the compute dtype on every GPU (false: no gathers in its forwards, 2 bytes/param).
    teacher_partitioned: bool = True
    max_nonfinite_in_a_row: int = 10  # stop after this many consecutive skipped (NaN/inf) updates
    # Sparse attention for the student (model/window.py): [t] or [t, h, w] half-widths in latent
    # tokens between video tokens, e.g. [3]; null: dense. Teacher and critic stay dense; the
    # student trains and samples with it, and its export records it (`train sample` uses it).
    student_video_window: list | None = None

    def __post_init__(self):
        _require(self.student_steps >= 1, "distill.student_steps", self.student_steps, "must be >= 1")
        if self.student_timesteps is not None:
            ts = [float(t) for t in self.student_timesteps]
            # The first value is 1: the student's first input is pure noise, which is t = 1.
            ok = len(ts) == self.student_steps and ts[0] == 1.0 and all(0 < t <= 1 for t in ts) and all(a > b for a, b in zip(ts[:-1], ts[1:]))
            _require(ok, "distill.student_timesteps", ts, f"need {self.student_steps} strictly decreasing values in (0, 1], the first 1.0 (the student starts from pure noise; the final 0 is implied), or null")
            self.student_timesteps = ts
        _require(self.critic_steps_per_generator_step >= 1, "distill.critic_steps_per_generator_step", self.critic_steps_per_generator_step, "must be >= 1")
        _require(0 <= self.dm_t_min < self.dm_t_max <= 1, "distill.dm_t_min/dm_t_max", (self.dm_t_min, self.dm_t_max), "need 0 <= dm_t_min < dm_t_max <= 1")
        _require(self.cfg > 0, "distill.cfg", self.cfg, "must be > 0 (1.0: no guidance)")
        for name in ("video_weight", "audio_weight", "gan_generator_weight", "gan_critic_weight", "grad_clip"):
            _require(getattr(self, name) >= 0, f"distill.{name}", getattr(self, name), "must be >= 0")
        _require(self.max_nonfinite_in_a_row >= 1, "distill.max_nonfinite_in_a_row", self.max_nonfinite_in_a_row, "must be >= 1")
        try:
            window = VideoWindow.parse(self.student_video_window)
        except ValueError as e:
            raise ConfigError(f"distill.student_video_window={self.student_video_window}: {e}; e.g. [3] (+-3 latent frames) or null (dense)") from None
        self.student_video_window = window.halves if window else None

    @property
    def student_window(self) -> VideoWindow | None:
        return VideoWindow.parse(self.student_video_window)

    @property
    def guidance(self) -> tuple[float, float]:
        return self.cfg, self.cfg if self.cfg_audio is None else self.cfg_audio
