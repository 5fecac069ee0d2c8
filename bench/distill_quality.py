"""Teacher (Euler, many steps, CFG) vs distilled student (its K steps, no guidance) on the
synthetic AV dataset: the same held-out prompts and seeds for both, measured against the
held-out real clips those prompts describe (measures in bench/av_quality.py).

    python bench/distill_quality.py --teacher runs/demo/pretrain/export/model.safetensors \
        --student runs/demo/distill/export/model.safetensors --clips 32

Reports, for real clips (the reference), teacher and student:
  fd            Fréchet-type distance of hand-made clip features to the held-out real clips,
                after z-scoring every feature by the real clips' statistics; "real" is the
                distance between two halves of the real clips (the noise floor at this n)
  sync          sound onsets vs detected motion events (mean |offset| ms, matched fractions)
  colour_acc    the dominant colour is one of the caption's colours
  axis_acc      horizontal/vertical motion as captioned (clips with those motions only)
  seconds/clip  wall-clock of generation (batch 1, the device named in the json)
With --float8 RECIPE the student is also sampled with FP8 block matmuls (train/float8.py), and with
--video-window T[,H,W] ... with windowed attention between video tokens (model/window.py), on the
same prompts and seeds: the same measures, and its clips' relative difference to the student's.
Writes bench/results/distill_quality_<device>_<date>.json (or --out) and prints a table.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from av_quality import clip_features, dominant_colour, frechet_distance, motion_axis, motion_events, sound_onsets, sync_error  # noqa: E402
from data.batching import stack_video  # noqa: E402
from data.config import LoaderConfig, SyntheticConfig  # noqa: E402
from data.decode import ClipSpec as DecodeSpec  # noqa: E402
from data.decode import decode_clip  # noqa: E402
from data.synthetic import synthetic_clip  # noqa: E402
from bench.environment import describe, slug  # noqa: E402
from model.window import VideoWindow, video_pairs_kept  # noqa: E402
from train.checkpoint import load_generator  # noqa: E402
from train.float8 import FLOAT8_RECIPES, apply_float8  # noqa: E402
from train.sampling import ClipSpec, Guidance, generate, latent_noise, seed_generators  # noqa: E402
from train.sequence import build_sequence  # noqa: E402

HELD_OUT_SEED = 1_000_003  # the training set uses seed 0: these scenes were never trained on


def held_out_clips(n: int, meta: dict, seconds: float, height: int, width: int, source_fps: int, source_rate: int):
    """n real clips of unseen scenes, decoded exactly like training data at the model's rates."""
    data = meta["data"]
    syn = SyntheticConfig(num_clips=n, seconds=seconds, fps=source_fps, width=max(64, 2 * width), height=max(64, 2 * height),
                          sample_rate=source_rate, seed=HELD_OUT_SEED, languages=["en"])
    loader = LoaderConfig(shards="unused", clip_seconds=seconds, fps=data["fps"], sample_rate=data["sample_rate"],
                          audio_channels=data["audio_channels"], buckets=[["eval", height, width]])
    spec = DecodeSpec.from_config(loader)
    clips = []
    for i in range(n):
        mp4, info = synthetic_clip(syn, i)
        clip = decode_clip(mp4, spec, random.Random(0))
        video = stack_video([clip.video], as_uint8=False)[0]
        clips.append({"video": video, "audio": torch.from_numpy(clip.audio), "meta": info, "caption": info["captions"]["en"]})
    return clips


def measure(clips: list[dict], fps: float, sample_rate: int) -> dict:
    """Per-set measures (everything but the Fréchet distance) and the feature matrix."""
    tolerance = 1 / fps + 0.01
    syncs, colour_hits, axis_hits = [], [], []
    for c in clips:
        onsets, events = sound_onsets(c["audio"], sample_rate), motion_events(c["video"], fps)
        syncs.append(sync_error(onsets, events, tolerance))
        colours = {s["colour"] for s in c["meta"]["shapes"]}
        colour_hits.append(dominant_colour(c["video"]) in colours)
        if c["meta"]["motion"] in ("horizontal", "vertical"):
            axis_hits.append(motion_axis(c["video"]) == c["meta"]["motion"])
    offsets = [s["mean_abs_offset_ms"] for s in syncs if s["mean_abs_offset_ms"] is not None]
    return {
        "sync_mean_abs_offset_ms": sum(offsets) / len(offsets) if offsets else None,
        "sync_onsets_matched": sum(s["onsets_matched"] for s in syncs) / len(syncs),
        "sync_events_matched": sum(s["events_matched"] for s in syncs) / len(syncs),
        "onsets_per_clip": sum(s["onsets"] for s in syncs) / len(syncs),
        "motion_events_per_clip": sum(s["events"] for s in syncs) / len(syncs),
        "colour_acc": sum(colour_hits) / len(colour_hits),
        "axis_acc": sum(axis_hits) / len(axis_hits) if axis_hits else None,
    }


def features(clips, fps, sample_rate) -> torch.Tensor:
    return torch.stack([clip_features(c["video"], c["audio"], fps, sample_rate) for c in clips])


def sample_set(path: str, generator, real: list[dict], seconds: float, height: int, width: int, steps: int | None,
               cfg: float | None, device: str):
    """One generated clip per real clip: its caption as the prompt, seed = clip index.
    generator: load_generator(path, device)."""
    model, codec, meta, _ = generator
    student = meta.get("student")
    steps = steps or (student["steps"] if student else 50)
    scale = cfg if cfg is not None else (1.0 if student else 5.0)
    data = meta["data"]
    spec = ClipSpec.from_seconds(seconds, data["fps"], height, width, data["sample_rate"])
    guidance = Guidance(scale, scale)
    out, times = [], []
    for i, c in enumerate(real):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        video, audio = generate(model, codec, [c["caption"]], [i], spec, steps, guidance, meta["text_len"],
                                flow_shift_args=meta["shift_args"], student=student)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        out.append({"video": video[0].cpu().clamp(-1, 1), "audio": audio[0].cpu(), "meta": c["meta"], "caption": c["caption"]})
    info = {"ckpt": path, "sampler": "student" if student else "euler", "steps": steps, "cfg": scale,
            "video_window": str(model.video_window) if model.video_window else "dense",
            "network_evaluations": steps * (2 if guidance.active else 1),
            # the first clip includes warm-up; the median is the steady state
            "seconds_per_clip_median": sorted(times)[len(times) // 2], "seconds_per_clip_mean": sum(times) / len(times)}
    return out, info


def clip_layout(generator, args):
    """The student's sequence layout at the benchmark's clip size (for the window's sparsity)."""
    model, codec, meta, _ = generator
    spec = ClipSpec.from_seconds(args.seconds, meta["data"]["fps"], args.height, args.width, meta["data"]["sample_rate"])
    video, audio = latent_noise(codec, spec, seed_generators([0]), "cpu")
    return build_sequence(model.args, [""], meta["text_len"], video, audio, task="t2v", trim_text=True).layout


def difference(clips: list[dict], reference: list[dict]) -> dict:
    """How far clips are from the same prompts and seeds sampled another way: mean over clips of
    |x - ref| / |ref| for the pixels and the waveform."""
    out = {}
    for key in ("video", "audio"):
        rel = [float((c[key] - r[key]).norm() / r[key].norm().clamp_min(1e-12)) for c, r in zip(clips, reference)]
        out[f"{key}_relative_difference_to_student"] = sum(rel) / len(rel)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--teacher-cfg", type=float, default=5.0)
    parser.add_argument("--source-fps", type=int, default=24, help="frame rate the held-out clips are rendered at")
    parser.add_argument("--source-rate", type=int, default=16000, help="sample rate the held-out clips are rendered at")
    parser.add_argument("--float8", choices=FLOAT8_RECIPES, default="none",
                        help="also sample the student with FP8 block matmuls (train/float8.py): the quality cost of FP8")
    parser.add_argument("--video-window", nargs="+", default=[], metavar="T[,H,W]",
                        help="also sample the student with each window of attention between video tokens (model/window.py), "
                             "e.g. 2 3 (+-2, +-3 latent frames): the quality cost of sparse attention")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        windows = [VideoWindow.parse(w) for w in args.video_window]
    except ValueError as e:
        parser.error(f"--video-window: {e}")

    torch.manual_seed(0)
    teacher_generator = load_generator(args.teacher, args.device)
    teacher_meta = teacher_generator[2]
    fps, rate = teacher_meta["data"]["fps"], teacher_meta["data"]["sample_rate"]
    real = held_out_clips(args.clips, teacher_meta, args.seconds, args.height, args.width, args.source_fps, args.source_rate)
    sets = {"real": (real, {"sampler": "held-out real clips"})}
    teacher, teacher_info = sample_set(args.teacher, teacher_generator, real, args.seconds, args.height, args.width,
                                       args.teacher_steps, args.teacher_cfg, args.device)
    student_generator = load_generator(args.student, args.device)
    student, student_info = sample_set(args.student, student_generator, real, args.seconds,
                                       args.height, args.width, None, None, args.device)
    sets["teacher"], sets["student"] = (teacher, teacher_info), (student, student_info)
    if args.float8 != "none":
        generator = load_generator(args.student, args.device)
        apply_float8(generator[0], args.float8, torch.device(args.device))
        fp8, fp8_info = sample_set(args.student, generator, real, args.seconds, args.height, args.width, None, None, args.device)
        fp8_info.update(float8=args.float8, **difference(fp8, student))
        sets["student_float8"] = (fp8, fp8_info)
    # A window is an attribute of the model, not a weight: the loaded student samples through each
    # in turn (FP8 above changes the weights' modules, so it loads its own copy).
    exported_window = student_generator[0].video_window
    for window in filter(None, windows):
        student_generator[0].video_window = window
        clips, info = sample_set(args.student, student_generator, real, args.seconds, args.height, args.width, None, None, args.device)
        info.update(video_window=str(window), video_pairs_kept=video_pairs_kept(clip_layout(student_generator, args), window),
                    **difference(clips, student))
        sets[f"student_window_{window}"] = (clips, info)
    student_generator[0].video_window = exported_window

    real_feats = features(real, fps, rate)
    mean, std = real_feats.mean(0), real_feats.std(0).clamp_min(1e-6)

    def z(x):
        return (x - mean) / std

    half = len(real) // 2
    report = {}
    for name, (clips, info) in sets.items():
        row = {**info, **measure(clips, fps, rate)}
        if name == "real":
            row["fd"] = frechet_distance(z(real_feats[:half]), z(real_feats[half:]))
            row["fd_note"] = "first half vs second half of the real clips: the floor at this sample size"
        else:
            row["fd"] = frechet_distance(z(features(clips, fps, rate)), z(real_feats))
        report[name] = row

    device = torch.device(args.device)
    result = {
        "what": "DMD-2 student vs its teacher on held-out synthetic AV clips (bench/distill_quality.py)",
        **describe(device, ["bench/distill_quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "clips": args.clips, "seconds": args.seconds, "height": args.height, "width": args.width,
        "teacher_step": teacher_meta.get("step"),
        "results": report,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"distill_quality_{slug(device)}_{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    keys = ["network_evaluations", "seconds_per_clip_median", "fd", "sync_mean_abs_offset_ms", "sync_onsets_matched", "sync_events_matched", "colour_acc", "axis_acc"]
    print(f"{'':24}" + "".join(f"{k[:18]:>20}" for k in keys))
    for name, row in report.items():
        cells = [row.get(k) for k in keys]
        print(f"{name:24}" + "".join(f"{'-' if v is None else (f'{v:.3f}' if isinstance(v, float) else v):>20}" for v in cells))
        if "video_relative_difference_to_student" in row:
            print(f"{'':24}relative difference to the student's clips: video {row['video_relative_difference_to_student']:.4f}, "
                  f"audio {row['audio_relative_difference_to_student']:.4f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
