"""Hyper-parameters of the joint audio-video transformer: one dataclass, no logic beyond checks."""

from dataclasses import dataclass, field

MODALITIES = ("text", "image", "video", "audio")
ROLES = ("generate", "condition")
GATES = ("scalar", "dynamic")
TEXT_INPUTS = ("bytes", "features")
TEXT_PADDINGS = ("left", "right")


@dataclass
class ModelArgs:
    # Width and attention. head_dim = dim // n_heads; n_kv_heads < n_heads is grouped-query attention.
    dim: int = 5120
    n_heads: int = 40
    n_kv_heads: int = 8
    mlp_hidden: int = 10752  # SwiGLU hidden width
    norm_eps: float = 1e-6

    # Depth: modality-specific blocks in, shared blocks, modality-specific blocks out.
    n_modality_in: int = 4
    n_shared: int = 32
    n_modality_out: int = 4

    # Per-head sigmoid gate on attention outputs. "dynamic" (default): a per-token, per-head gate
    # computed from the block input (query-dependent, as in Qiu et al. 2025, "Gated Attention for
    # LLMs"); "scalar": one learned logit per head. Both start at sigmoid(gate_init_logit).
    gate: str = "dynamic"
    gate_init_logit: float = 0.0

    # Latent interfaces. Video latents are (C, T, H, W), images (C, H, W) from the same video codec,
    # audio latents (C, T). Text is UTF-8 bytes through an embedding or features through a projection.
    video_channels: int = 48
    video_patch: tuple[int, int, int] = (1, 2, 2)
    audio_channels: int = 64
    audio_patch: int = 1
    text_input: str = "features"
    text_feature_dim: int = 2304
    # Where a byte caption's padding goes. "left" (before BOS): the real tokens end next to the
    # video on the time axis whatever the padded length, so a caption can be cut to its own length
    # with no padding mask and give the same result (the sampler does). "right" (after EOS): how
    # models were trained before 2026-11-26; their files have no text_padding and load as "right".
    text_padding: str = "left"

    # Audio latent frames per video latent frame (e.g. 21.5 Hz audio latents / 6.25 Hz video
    # latents); puts audio tokens on the video's time axis so equal instants get equal RoPE t.
    audio_latents_per_video_frame: float = 3.44

    # Rotary embeddings over (t, h, w). rope_axes_dim splits head_dim between the axes; empty
    # means an even split with the remainder on t.
    rope_theta: float = 10000.0
    rope_axes_dim: tuple[int, ...] = field(default_factory=tuple)
    time_freq_dim: int = 256

    modalities: tuple[str, ...] = MODALITIES

    def __post_init__(self):
        # Hydra hands lists over as ListConfig; keep plain tuples so the args hash and compare.
        self.video_patch = tuple(int(p) for p in self.video_patch)
        self.rope_axes_dim = tuple(int(a) for a in self.rope_axes_dim)
        self.modalities = tuple(self.modalities)
        self._check()
        if not self.rope_axes_dim:
            per_axis = 2 * (self.head_dim // 6)
            self.rope_axes_dim = (self.head_dim - 2 * per_axis, per_axis, per_axis)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_layers(self) -> int:
        return self.n_modality_in + self.n_shared + self.n_modality_out

    @property
    def patch_dims(self) -> dict[str, int]:
        """Latent values in one token of each latent modality (what its input projection reads
        and its output head writes)."""
        pt, ph, pw = self.video_patch
        return {
            "video": self.video_channels * pt * ph * pw,
            "image": self.video_channels * ph * pw,
            "audio": self.audio_channels * self.audio_patch,
        }

    def _check(self):
        def bad(name, value, why):
            raise ValueError(f"ModelArgs.{name}={value!r}: {why}")

        for name in ("dim", "n_heads", "n_kv_heads", "mlp_hidden", "video_channels", "audio_channels", "audio_patch"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "must be a positive integer")
        for name in ("n_modality_in", "n_shared", "n_modality_out"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "must be >= 0")
        if self.dim % self.n_heads:
            bad("n_heads", self.n_heads, f"must divide dim={self.dim}")
        if self.head_dim % 2:
            bad("n_heads", self.n_heads, f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.gate not in GATES:
            bad("gate", self.gate, f"choose one of {', '.join(GATES)}")
        if self.text_input not in TEXT_INPUTS:
            bad("text_input", self.text_input, f"choose one of {', '.join(TEXT_INPUTS)}")
        if self.text_padding not in TEXT_PADDINGS:
            bad("text_padding", self.text_padding, f"choose one of {', '.join(TEXT_PADDINGS)}")
        if self.text_input == "features" and self.text_feature_dim <= 0:
            bad("text_feature_dim", self.text_feature_dim, "must be > 0 when text_input='features'")
        if len(self.video_patch) != 3 or min(self.video_patch) <= 0:
            bad("video_patch", self.video_patch, "must be three positive ints (t, h, w)")
        if self.audio_latents_per_video_frame <= 0:
            bad("audio_latents_per_video_frame", self.audio_latents_per_video_frame, "must be > 0")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            bad("modalities", self.modalities, f"each must be one of {', '.join(MODALITIES)}")
        if self.rope_axes_dim:
            if len(self.rope_axes_dim) != 3 or any(a % 2 or a <= 0 for a in self.rope_axes_dim):
                bad("rope_axes_dim", self.rope_axes_dim, "must be three positive even ints (t, h, w)")
            if sum(self.rope_axes_dim) != self.head_dim:
                bad("rope_axes_dim", self.rope_axes_dim, f"must sum to head_dim={self.head_dim}")
