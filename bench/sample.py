"""Sampling latency of the hh15b model: one forward (one student step) at 720p and 1080p for 5 s
and 15 s clips, the 8-step student and the 50-step teacher with CFG (cond and uncond as two
forwards at batch 1, the uncond one with the empty caption's 2 text tokens, as train/sampling.py
runs them: no forward has a padding mask).

    python bench/sample.py                       # GPU: hh15b, layers timed at two depths
    python bench/sample.py --full                # time the whole 40-layer model (needs ~30 GB + activations)
    python bench/sample.py --compile --float8 none tensorwise rowwise   # bf16, then FP8 block matmuls
    python bench/sample.py --compile --clips 1920x1080x5 --video-window none 3 2   # dense, then +-3 and +-2 frames
    python bench/sample.py --preset tiny --clips 64x64x1 --repeats 1     # CPU (what the tests run)

Token counts assume hh15b's latents: a Wan2.2-style video VAE (16x spatial, 4x temporal, 48 ch,
24 fps in), 1x2x2 patches, Stable Audio latents at 21.5 Hz, 256 text-feature tokens; e.g. 5 s
1080p = 31 x 34 x 60 + 108 + 256 = 63,604 tokens. Latent shapes come from that arithmetic, not
from a VAE (none is loaded). Without --full the model is built twice with 1 modality block in, k
shared blocks and 1 out (k = --depths), and a forward of the whole model is extrapolated:
fixed (embeddings, heads, timestep MLP) + 40 x per-layer time, with per-layer = (t(k2) - t(k1)) /
(k2 - k1). Modality and shared blocks do the same work per token (a token meets one weight set),
so one per-layer time serves both. VAE decoding is not included. Forwards run in bf16 under
torch.inference_mode with the attention order of training (cuDNN first), compiled per block with
--compile (static shapes: each forward shape its own graph); with --float8 the blocks' projections
run on the FP8 tensor cores (torchao, train/float8.py; the weights are cast at each forward, as in
training); with --video-window each video token attends only to the video tokens within that
window (model/window.py; FlexAttention, compiled into the blocks with --compile, and compiled on
its own otherwise: eager it would compute every score), each window timed in turn on the same
models. Writes
bench/results/sample_<device>_<date>.{json,md}, rewritten after each clip (a run stopped early
keeps the clips it finished: order --clips by priority).
"""

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from bench.environment import describe, slug, write  # noqa: E402
from model import AVTransformer, ModelArgs, Segment, SequenceLayout  # noqa: E402
from model.window import VideoWindow, computed_fraction, video_pairs_kept, window_block_mask  # noqa: E402
from train.float8 import FLOAT8_RECIPES, apply_float8  # noqa: E402
from train.flops import forward_flops  # noqa: E402
from train.parallelize import apply_compile, attention_backends  # noqa: E402

VAE_SPATIAL, VAE_TEMPORAL, VIDEO_FPS, AUDIO_LATENT_HZ, TEXT_TOKENS = 16, 4, 24, 21.5, 256
CLIPS = ["1280x720x5", "1920x1080x5", "1280x720x15", "1920x1080x15"]
STUDENT_STEPS, TEACHER_STEPS = 8, 50


def segments(args: ModelArgs, width: int, height: int, seconds: float, text_tokens: int = TEXT_TOKENS) -> list[Segment]:
    """The t2v layout of one clip: text condition, generated video latents and audio latents."""
    _, ph, pw = args.video_patch
    lat_t = 1 + round(seconds * VIDEO_FPS) // VAE_TEMPORAL
    lat_h = ph * math.ceil(math.ceil(height / VAE_SPATIAL) / ph)
    lat_w = pw * math.ceil(math.ceil(width / VAE_SPATIAL) / pw)
    audio = args.audio_patch * math.ceil(seconds * AUDIO_LATENT_HZ / args.audio_patch)
    text = (text_tokens,) if args.text_input == "bytes" else (text_tokens, args.text_feature_dim)
    return [Segment("text", "condition", text), Segment("video", "generate", (args.video_channels, lat_t, lat_h, lat_w)),
            Segment("audio", "generate", (args.audio_channels, audio))]


def time_forward(model: AVTransformer, segs, repeats: int, device) -> float:
    """Median seconds of one batch-1 forward (after one untimed warm-up forward)."""
    layout = model.layout(segs)
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = []
    for seg in layout.segments:
        if seg.modality == "text" and model.args.text_input == "bytes":
            inputs.append(torch.randint(0, 256, (1, *seg.shape), generator=g).to(device))
        else:
            inputs.append(torch.randn(1, *seg.shape, generator=g).to(device, torch.bfloat16))
    t = torch.tensor([[0.0] + [0.7] * (len(segs) - 1)], device=device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(inputs, layout, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(preset: dict, device, compile_blocks: bool, float8: str = "none", **depth) -> AVTransformer:
    args = ModelArgs(**{**preset, **depth})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: 30 GB, not 60 GB of fp32 first
    try:
        with torch.device(device):
            model = AVTransformer(args).eval()
    finally:
        torch.set_default_dtype(default)
    if float8 != "none":  # before compile, as training applies it
        apply_float8(model, float8, device)
    if compile_blocks:
        # Static shapes: each timed forward runs the graph of its own shape, as a sampler of one
        # clip size and no guidance does (training's dynamic=None would make the first change of
        # shape, e.g. the uncond forward's 2-token text, a dynamic graph that every later clip used).
        apply_compile(model, dynamic=False)
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="hh15b", help="conf/model/<preset>.yaml")
    p.add_argument("--clips", nargs="+", default=CLIPS, help="WIDTHxHEIGHTxSECONDS")
    p.add_argument("--full", action="store_true", help="time the whole model instead of extrapolating from two depths")
    p.add_argument("--depths", type=int, nargs=2, default=[1, 3], help="shared blocks of the two timed models")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--float8", choices=FLOAT8_RECIPES, nargs="+", default=["none"],
                   help="FP8 block matmuls (train/float8.py), each recipe timed in turn (e.g. none tensorwise)")
    p.add_argument("--video-window", nargs="+", default=["none"], metavar="T[,H,W]",
                   help="attention windows between video tokens (model/window.py), each timed in turn: none (dense), "
                        "3 (+-3 latent frames), 3,12 (and +-12 rows), 3,12,all ...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    try:
        windows = [VideoWindow.parse(w) for w in args.video_window]
    except ValueError as e:
        p.error(f"--video-window: {e}")
    device = torch.device(args.device)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{args.preset}.yaml"))
    cfg.pop("_target_")
    if cfg.get("video_channels") is None or cfg.get("audio_channels") is None:
        cfg.update(video_channels=cfg.get("video_channels") or 48, audio_channels=cfg.get("audio_channels") or 64,
                   audio_latents_per_video_frame=AUDIO_LATENT_HZ / (VIDEO_FPS / VAE_TEMPORAL))
    full_args = ModelArgs(**cfg)
    n_layers = full_args.n_layers

    depths = [n_layers] if args.full else [k + 2 for k in args.depths]
    how = "whole model" if args.full else f"extrapolated from {depths} layers"
    result = {"benchmark": "sample", **describe(device, ["bench/sample.py", *(sys.argv[1:] if argv is None else argv)]),
              "preset": args.preset, "layers": n_layers, "extrapolated_from_depths": None if args.full else depths,
              "compile": args.compile, "float8": args.float8, "video_windows": [str(w) if w else "dense" for w in windows], "latents": {"vae_spatial": VAE_SPATIAL, "vae_temporal": VAE_TEMPORAL, "video_fps": VIDEO_FPS,
                                                   "audio_latent_hz": AUDIO_LATENT_HZ, "text_tokens": TEXT_TOKENS},
              "results": []}
    rows, stem = result["results"], f"sample_{slug(device)}_{result['date']}{args.tag}"
    title = f"{args.preset}, {n_layers} layers ({how}), bf16 activations (block matmuls: the float8 column), compile={args.compile}"
    for float8 in args.float8:
        torch._dynamo.reset()  # each recipe's blocks compile their own graphs (dynamo caches per code object)
        if args.full:
            models = {n_layers: build(cfg, device, args.compile, float8)}
        else:
            models = {k + 2: build(cfg, device, args.compile, float8, n_modality_in=1, n_shared=k, n_modality_out=1) for k in args.depths}
        with attention_backends():
            for clip in args.clips:
                for window in windows:
                    for m in models.values():
                        m.video_window = window
                    rows.append(time_clip(models, full_args, clip, args, device, window) | {"float8": float8})
                    print(rows[-1], file=sys.stderr)
                    write(result, args.out, stem, table(rows, title))
        # The next recipe's models are built in this memory: the compiled forwards (a cycle through
        # each block) and dynamo's caches hold these ones until both are cleared.
        del models
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def time_clip(models: dict[int, AVTransformer], full_args: ModelArgs, clip: str, args, device, window: VideoWindow | None = None) -> dict:
    """One clip's row: the student's and the uncond forward, measured at each depth (and
    extrapolated to the whole model), the 8-step and the 50-step + CFG totals. With a window,
    FLOPs count the attention pairs inside it (train/flops.py), and the tiles the kernel computes
    are reported beside them."""
    n_layers = full_args.n_layers
    width, height, seconds = (float(x) for x in clip.split("x"))
    segs = segments(full_args, int(width), int(height), seconds)
    uncond = segments(full_args, int(width), int(height), seconds, text_tokens=2)  # the empty caption: BOS + EOS
    layout = SequenceLayout(segs, full_args)
    row = {"clip": f"{int(width)}x{int(height)} {seconds:g} s", "tokens": layout.n_tokens, "video_window": str(window) if window else "dense",
           "attention_tiles_computed": 1.0, "video_pairs_kept": 1.0}
    if window:
        row["attention_tiles_computed"] = computed_fraction(window_block_mask(layout, window, device))
        row["video_pairs_kept"] = video_pairs_kept(layout, window)
    for layout_segs, name in ((segs, "student_forward_s"), (uncond, "uncond_forward_s")):
        measured = {depth: time_forward(m, layout_segs, args.repeats, device) for depth, m in models.items()}
        row[name.replace("_s", "_measured_s")] = {str(depth): t for depth, t in measured.items()}
        if args.full:
            row[name] = measured[n_layers]
        else:
            per_layer, fixed, fit = extrapolate(measured)
            row[name] = fixed + n_layers * per_layer
            row[name.replace("_s", "_per_layer_s")] = per_layer
            row[name.replace("_s", "_fixed_s")] = fixed
            row[name.replace("_s", "_fit")] = fit
    row["teacher_cfg_forward_s"] = row["student_forward_s"] + row["uncond_forward_s"]
    row["student_8_steps_s"] = STUDENT_STEPS * row["student_forward_s"]
    row["teacher_50_steps_cfg_s"] = TEACHER_STEPS * row["teacher_cfg_forward_s"]
    flops = forward_flops(layout, window=window)
    row["forward_tflops"] = flops / 1e12
    row["forward_tflops_per_s"] = flops / row["student_forward_s"] / 1e12
    return row


def extrapolate(measured: dict[int, float]) -> tuple[float, float, str]:
    """(seconds a layer, fixed seconds, how) from the forward times of two depths: the model's time
    is a fixed part (embeddings, heads) plus one per layer. The line through the two points
    multiplies their timing noise by about (layers - d1) / (d2 - d1) at full depth, and noise
    can give it a negative fixed part, which no model has; then the fit is the least-squares
    line with no fixed part, from both points."""
    (d1, t1), (d2, t2) = sorted(measured.items())
    per_layer = (t2 - t1) / (d2 - d1)
    fixed = t1 - d1 * per_layer
    if fixed >= 0:
        return per_layer, fixed, "line through both depths"
    return (d1 * t1 + d2 * t2) / (d1 * d1 + d2 * d2), 0.0, "no fixed part (the line's was negative: timing noise)"


def table(rows: list[dict], title: str) -> str:
    lines = [title, "", "| clip | tokens | float8 | video window (attention tiles computed) | 1 forward s | TFLOP/s | student 8 steps s | teacher 50 steps + CFG s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        window = r.get("video_window", "dense")
        window = window if window == "dense" else f"{window} ({r['attention_tiles_computed']:.1%})"
        lines.append(f"| {r['clip']} | {r['tokens']} | {r['float8']} | {window} | {r['student_forward_s']:.4g} | {r['forward_tflops_per_s']:.4g} | "
                     f"{r['student_8_steps_s']:.4g} | {r['teacher_50_steps_cfg_s']:.4g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
