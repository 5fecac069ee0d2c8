"""Model FLOPs of the transformer, for throughput and MFU (train/throughput.py, bench/).

Counted from the shapes alone (no parameter is read, so this works on the meta device and under
ZeRO-3, where a rank holds a slice of each weight). A matmul of (n x k) by (k x m) is 2 n k m.
Forward of one sample:
- every token: its modality's input projection, then per block one weight set's qkv, head gate,
  output projection and SwiGLU; a `generate` token also its modality's output head;
- attention: QK^T and PV over the whole sequence, 2 x 2 N^2 dim per block (GQA shares K/V but
  not the score FLOPs); with a window between video tokens (model/window.py), over the pairs
  inside it instead of N^2;
- per (sample, segment): the timestep MLP and modulation, and the output heads' modulation.
Backward is twice the forward, so a training step is 3x: the "model FLOPs" of MFU, which leave
out activation-checkpointing recompute (that is the hardware's extra work, not the model's).
Norms, RoPE, gating and the softmax are not matmuls and are not counted (as in MFU everywhere).
"""

from model import ModelArgs, SequenceLayout
from model.window import VideoWindow, attended_pairs

H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM, dense bf16 (DESIGN.md; the peak bench/ reports MFU against)


def block_matmul_params(args: ModelArgs) -> int:
    """Weights one token multiplies with in one block (one weight set)."""
    d, kv = args.dim, args.n_kv_heads * args.head_dim
    params = d * (d + 2 * kv) + d * d + 3 * d * args.mlp_hidden
    if args.gate == "dynamic":
        params += d * args.n_heads
    return params


def forward_flops(layout: SequenceLayout, batch: int = 1, blocks: int | None = None, window: VideoWindow | None = None) -> float:
    """FLOPs of one forward of the model over `batch` samples of `layout`. blocks: a forward that
    stops after this many blocks and runs no output head (AVTransformer's stop_after_block + 1).
    window: the model's video_window (attention over the pairs inside it)."""
    a = layout.args
    d, n = a.dim, layout.n_tokens
    n_blocks = a.n_layers if blocks is None else blocks
    # a text token's input: a byte lookup (no matmul) or a feature projection
    patch = {**a.patch_dims, "text": 0 if a.text_input == "bytes" else a.text_feature_dim}
    per_sample = 2 * n * n_blocks * block_matmul_params(a) + 4 * n_blocks * attended_pairs(layout, window) * d
    per_sample += 2 * (a.time_freq_dim * d + d * d + 6 * d * d) * len(layout.segments)
    for seg, length in zip(layout.segments, layout.lengths):
        per_sample += 2 * length * patch[seg.modality] * d
        if seg.role == "generate" and blocks is None:
            per_sample += 2 * length * d * patch[seg.modality] + 2 * d * 2 * d
    return float(batch * per_sample)


def train_flops(layout: SequenceLayout, batch: int = 1) -> float:
    """Forward + backward (2x forward) of a training step."""
    return 3.0 * forward_flops(layout, batch)
