"""Plain config objects for the training stages. Hydra's DictConfig is turned into these once, at
the entry point; library code only ever sees these dataclasses. Each checks its own ranges and
raises ConfigError naming the option, the value and what is allowed."""

from dataclasses import dataclass, field


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
    activation_checkpointing: bool = False
    compile: bool = False
    checkpoint_every_n_steps: int = 100
    resume: str | None = None  # a .ckpt path, "auto" (last checkpoint in run_dir if any) or None
    export: bool = True  # write export/model.safetensors (EMA weights) at the end

    def __post_init__(self):
        _require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in [0, 1)")
        _require(self.checkpoint_every_n_steps >= 1, "checkpoint_every_n_steps", self.checkpoint_every_n_steps, "must be >= 1")
