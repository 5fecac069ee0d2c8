"""Training-step speed of the project's real pretraining step: `PretrainModule.training_step`
(codec, sequence, forward, loss), Lightning's backward, gradient clipping, fused AdamW and the EMA
update, run by a `lightning.Trainer` exactly as `python -m train pretrain` runs it. Only the data
loader is replaced by one fixed, pinned batch (bench/data_throughput.py measures decoding).

    # H100: the proxy (hh15b width and heads, 1 + 4 + 1 layers, text/video/audio), 16K and 32K tokens
    python bench/train_step.py --preset proxy --tokens 16384 32768 --compile --ac none
    # the same step with the text padding mask, without it, and with captions of varying length
    python bench/train_step.py --preset proxy --tokens 16384 --compile --text padded full varied fresh
    # the block matmuls in FP8 (torchao), two scaling recipes against bf16
    python bench/train_step.py --preset proxy --tokens 16384 --compile --text full --float8 none tensorwise rowwise
    # CPU, the tiny model (what the tests run)
    python bench/train_step.py --preset tiny --tokens 256 --steps 2 --warmup 12

Captions:
- "padded": a 49-token caption in the 64-token text segment, not trimmed (`trim_text=false`), so
  every attention has a key mask: training before the text was trimmed;
- "full": a caption that fills the segment: no mask, one static shape;
- "varied": captions of 12 lengths in turn (2 to 64 tokens, the empty one of caption dropout
  among them), trimmed as training trims them (`trim_text=true`, the default): no mask at batch
  1, and under --compile the dynamic-shape graph that a changing text length brings. The warm-up
  sees every length once (--warmup >= 12), so the timed steps are a long run's: shapes already
  seen (rotary tables rebuilt, as most of a long run's steps rebuild them).
  Against "full": what the dynamic-shape graph costs per step;
- "fresh": as varied, but every step a length not seen before (the first pass of a run over the
  lengths; at most 63 steps). Against "varied": what a new shape costs once. On the H200
  (2026-11-26), steps of new lengths took 0.570 s against 0.495 s for one static shape, with no
  more GPU busy time: host time, whose operators --profile's "host" list names.

Reports per case: step time (the timed steps as one window over whole loop iterations, divided by
their number; the device is synchronised only at the window's ends, so a step's host work overlaps
the previous step's kernels as in training; up to 2026-11-26's lease 4 the device was synchronised
around each step, which added each step's host work before its first kernel: 14-20 ms of the
proxy's 16K step), the graphs dynamo compiled during the timed steps (0 unless a shape broke a
guard), the first step's time (compilation included), tokens/s (the
clip's tokens at the full text length, as training's perf/tokens_per_sec) and model TFLOP/s over
the timed steps (train/flops.py: 3 x forward matmuls and attention, no recompute, of the sequence
the model ran: trimmed captions count their own length), MFU against 989 TFLOP/s (the bf16 dense
peak, also for --float8 cases, whose block matmuls run on the FP8 tensor cores: there it is the
bf16-equivalent rate), peak memory;
writes bench/results/train_step_<device>_<date>.{json,md}, rewritten after each case (a run stopped
early keeps the cases it finished).
"""

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters as dynamo_counters
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from bench.environment import describe, slug, write  # noqa: E402
from model import ModelArgs, count_parameters  # noqa: E402
from train.codec import PatchCodec  # noqa: E402
from train.config import FlowConfig, OptimConfig, RunConfig  # noqa: E402
from train.float8 import FLOAT8_RECIPES  # noqa: E402
from train.flops import H100_BF16_DENSE_FLOPS  # noqa: E402
from train.parallelize import AC_MODES, DEFAULT_ATTENTION_ORDER, attention_backends  # noqa: E402
from train.pretrain import PretrainModule  # noqa: E402
from train.sequence import tokens_per_sample  # noqa: E402
from train.throughput import ModelFlops  # noqa: E402

REFERENCE_BLOCK_TFLOPS = 595.1  # ../shared/bench: one compiled d=5120 block, 16K tokens, H100
FPS, SAMPLE_RATE, TEXT_LEN = 25, 16000, 64  # 16 frames = 0.64 s = 10240 samples = 160 audio latents
FULL_CAPTION = "a red circle bounces off the floor with a click, then rolls aw"  # 62 bytes: 64 tokens with BOS, EOS
# Captions in BOS + bytes + EOS tokens: FULL_CAPTION[:n] is n + 2 tokens, 2 to 64.
# 12 lengths, 2 to 64 tokens: more than model.transformer.rope_tables caches (8), so its tables are
# rebuilt each step, as in a run over the 63 caption lengths
VARIED = [FULL_CAPTION[:n] for n in (47, 62, 0, 28, 55, 10, 38, 20, 5, 33, 51, 15)]
FRESH = [FULL_CAPTION[: (29 * i) % 63] for i in range(63)]  # 63 distinct lengths (29 is prime to 63), scattered
CAPTIONS = {  # each step's caption, cycled
    "padded": [FULL_CAPTION[:47]],  # 49 tokens: 15 padding, a key mask
    "full": [FULL_CAPTION],  # 64 tokens: no mask
    "varied": VARIED,
    "fresh": FRESH,  # never cycled: main() refuses more steps than lengths
}

PRESETS = {
    # hh15b's width, heads, MLP and gate; modality layers for text/video/audio as in t2v training.
    # 1 + 4 + 1 layers, 2.6B parameters (a modality layer holds one weight set per modality): the
    # weights, gradients, AdamW states and EMA (20 bytes a parameter, 48 GiB) and the activations of
    # 16K tokens without recompute (<= 16 GiB, train/memory.py) fit an H100; 1 + 6 + 1 layers (3.0B,
    # 56 GiB + up to 21 GiB) would be at the edge of its 80 GB.
    "proxy": dict(dim=5120, n_heads=40, n_kv_heads=8, mlp_hidden=10752, n_modality_in=1, n_shared=4, n_modality_out=1,
                  modalities=("text", "video", "audio")),
    "tiny": dict(dim=32, n_heads=4, n_kv_heads=2, mlp_hidden=64, n_modality_in=1, n_shared=1, n_modality_out=1,
                 modalities=("text", "video", "audio")),
}
# Codec: space-to-depth 4x gives 48 video channels (as Wan2.2's VAE), a hop of 64 gives 64 audio
# channels (as Stable Audio's), so embeddings and heads have hh15b's shapes.
CODEC = dict(video_spatial=4, video_temporal=1, audio_hop=64, image_channels=3, audio_channels=1)


def clip_for_tokens(target: int, codec: PatchCodec, args: ModelArgs, frames: int) -> tuple[int, int]:
    """(height, width) of a 16:9-ish clip of `frames` frames whose sequence is close to `target` tokens."""
    best = None
    for h in range(16, 4096, 16):
        w = 16 * round(h * 16 / 9 / 16)
        n = tokens_per_sample(args, codec, frames / FPS, FPS, SAMPLE_RATE, h, w, TEXT_LEN)
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, h, w)
        if n > target:
            break
    return best[1], best[2]


class StepTimer(L.Callback):
    """Time of the steps warmup .. stop - 1 as one window, from the start of step `warmup` to the
    start of step `stop`: whole loop iterations (data, forward, backward, optimizer step, EMA,
    Lightning's bookkeeping, the next batch's copy to the device), the device synchronised only at
    the window's two ends, so steps overlap on the host and the device as in training (a sync in
    the step itself shows as GPU idle time here). The first step, compilation included, is timed
    on its own. FLOPs counted by the same hook as training's perf/mfu; whether each step's forward
    had an attention key mask; how many graphs dynamo compiled in the window (0 unless a shape
    broke a guard: then the window holds a compilation)."""

    def __init__(self, warmup: int, stop: int):
        self.warmup, self.stop, self.first_step_s, self.window_s = warmup, stop, None, None
        self.flops, self.tokens, self.masked = [], [], []
        self.graphs_at_start = self.graphs_compiled_timed = None

    def on_train_start(self, trainer, module):  # after configure_model has built the model
        self.counter = ModelFlops(module)
        module.model.register_forward_pre_hook(self._see_mask, with_kwargs=True)

    def _see_mask(self, net, args, kwargs):
        self.step_masked |= (args[3] if len(args) > 3 else kwargs.get("key_mask")) is not None

    def _now(self, module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup and module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if batch_idx in (0, self.warmup):
            self.start = self._now(module)
        if batch_idx == self.warmup:
            self.graphs_at_start = dynamo_counters["stats"]["unique_graphs"]
        if batch_idx == self.stop:
            self.window_s = self._now(module) - self.start
            self.graphs_compiled_timed = dynamo_counters["stats"]["unique_graphs"] - self.graphs_at_start
        self.counter.total, self.counter.counting = 0.0, True
        self.step_masked = False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.counter.counting = False
        if batch_idx == 0:
            self.first_step_s = self._now(module) - self.start
        if self.warmup <= batch_idx < self.stop:
            self.flops.append(self.counter.total)
            self.tokens.append(module.tokens_in_step)
            self.masked.append(self.step_masked)


class StepProfiler(L.Callback):
    """torch.profiler over one whole loop iteration, from the start of batch `at` (after the timed
    window) to the start of the next, so the timings carry no profiler overhead: the `top`
    operators by self time on the device (on the host when there is no GPU), with their share of
    the total, to split a step's time by kernel (matmuls, attention, optimizer, elementwise)
    within one device call; on a GPU also the `host_top` host operators, for a step whose time
    the GPU's busy time does not explain, and the calls that wait for the GPU (`host_syncs`:
    none in a step free of host syncs)."""

    def __init__(self, at: int, top: int = 30, host_top: int = 15):
        self.at, self.top, self.host_top, self.error = at, top, host_top, None
        self.rows, self.total_ms, self.host, self.syncs = [], None, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        on_gpu = module.device.type == "cuda"
        if batch_idx == self.at:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if on_gpu:
                torch.cuda.synchronize()
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
        elif batch_idx == self.at + 1:
            if on_gpu:
                torch.cuda.synchronize()
            self.prof.stop()
            try:
                self._summarise(on_gpu)
            except Exception as e:  # a profile is extra: it must not cost the case its timings
                self.error = f"{type(e).__name__}: {e}"
                print(f"profile failed: {self.error}")

    def _summarise(self, on_gpu: bool):
        averages = self.prof.key_averages()
        host = [e for e in averages if e.device_type == DeviceType.CPU and not e.is_user_annotation]
        if on_gpu:
            # the GPU's own events (kernels, copies), as PyTorch's table totals them: the host
            # ops that launched them and user annotations carry the same time again
            events = [e for e in averages if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
            self.total_ms, self.rows = ranked([(e.self_device_time_total, e) for e in events], self.top)
            # and what the host spent its time on: where the GPU waits for it (a step longer
            # than the GPU's busy time), the operators that made it wait are at the top here
            host_ms, host_rows = ranked([(e.self_cpu_time_total, e) for e in host], self.host_top)
            self.host = {"total_ms": host_ms, "top": host_rows}
            self.syncs = {e.key: e.count for e in host if "Synchronize" in e.key}
            # less the profiler's own, before it stops
            self.syncs["cudaDeviceSynchronize"] = self.syncs.get("cudaDeviceSynchronize", 1) - 1
            self.syncs = {k: n for k, n in self.syncs.items() if n}
        else:
            self.total_ms, self.rows = ranked([(e.self_cpu_time_total, e) for e in host], self.top)


def ranked(timed: list, top: int) -> tuple[float, list[dict]]:
    """(total ms, the `top` operators by self time with their share of the total) of
    (self microseconds, profiler event) pairs."""
    timed = [(us, e) for us, e in timed if us > 0]
    total = sum(us for us, _ in timed)
    rows = sorted(timed, key=lambda pair: -pair[0])[:top]
    return total / 1e3, [{"op": e.key[:160], "calls": e.count, "self_ms": round(us / 1e3, 3), "share": round(us / total, 4)} for us, e in rows]


def profile_table(profile: dict) -> str:
    def part(title: str, total_ms: float, rows: list[dict]) -> list[str]:
        return [f"{title}: {total_ms:.1f} ms of self time", "| op | calls | self ms | share |", "| --- | --- | --- | --- |",
                *(f"| `{r['op']}` | {r['calls']} | {r['self_ms']} | {100 * r['share']:.1f}% |" for r in rows)]

    lines = part(f"profile of one step on the {profile['clock']}", profile["total_ms"], profile["top"])
    if "host" in profile:
        lines += ["", *part("the same step on the host", profile["host"]["total_ms"], profile["host"]["top"])]
        syncs = profile.get("host_syncs") or {}
        lines += ["", "host waits for the GPU in the step: " + (", ".join(f"{k} x{n}" for k, n in syncs.items()) or "none")]
    return "\n".join(lines)


def run_case(args, tokens_target: int, text: str, float8: str, device: torch.device) -> dict:
    # Each case compiles its own graphs: dynamo caches per code object, so a later case would
    # otherwise run an earlier one's graphs ("full" after "varied": the dynamic one, not its own).
    torch._dynamo.reset()
    codec = PatchCodec(**CODEC)
    margs = ModelArgs(**PRESETS[args.preset], video_channels=codec.video_latent_channels, audio_channels=codec.audio_latent_channels,
                      video_patch=(1, 2, 2), audio_patch=1, text_input="bytes",
                      audio_latents_per_video_frame=codec.audio_latents_per_video_frame(FPS, SAMPLE_RATE))
    frames = args.frames
    h, w = clip_for_tokens(tokens_target, codec, margs, frames)
    tokens = tokens_per_sample(margs, codec, frames / FPS, FPS, SAMPLE_RATE, h, w, TEXT_LEN)
    samples = round(frames / FPS * SAMPLE_RATE)
    g = torch.Generator().manual_seed(0)
    batch = {
        "video": torch.rand(args.batch, 3, frames, h, w, generator=g) * 2 - 1,
        "audio": (torch.rand(args.batch, 1, samples, generator=g) * 2 - 1) * 0.3,
        "audio_mask": torch.ones(args.batch, samples, dtype=torch.bool),
    }
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    # the timed window ends at the start of the step after it; the profiled step comes after the
    # window and ends at the start of the next
    n_steps = args.warmup + args.steps + (2 if args.profile else 1)
    step_captions = [CAPTIONS[text][i % len(CAPTIONS[text])] for i in range(n_steps)]
    trim_text = text != "padded"  # RunConfig.trim_text: every case but the one of training before it
    batches = [{**batch, "caption": [caption] * args.batch} for caption in step_captions]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)

    with tempfile.TemporaryDirectory() as tmp:
        run = RunConfig(run_dir=tmp, activation_checkpointing=args.ac, compile=args.compile, attention_backends=args.attention,
                        trim_text=trim_text, float8=float8)
        flow = FlowConfig(text_len=TEXT_LEN, caption_dropout=0.0)
        meta = {"data": {"fps": FPS, "sample_rate": SAMPLE_RATE}, "text_len": TEXT_LEN, "shift_args": flow.shift_args}
        # ModelArgs, as `python -m train pretrain` passes them: the module builds the model in
        # configure_model, on the device.
        module = PretrainModule(margs, codec, flow, OptimConfig(warmup_steps=1), run, meta)
        timer = StepTimer(args.warmup, args.warmup + args.steps)
        profiler = StepProfiler(at=args.warmup + args.steps) if args.profile else None
        trainer = L.Trainer(
            accelerator=device.type, devices=1, precision="bf16-mixed" if device.type == "cuda" else "32-true",
            max_steps=n_steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[timer] + ([profiler] if profiler else []), default_root_dir=tmp,
        )
        with attention_backends(run.attention_backends):
            trainer.fit(module, train_dataloaders=loader)

    step_s = timer.window_s / args.steps
    flops_per_s = sum(timer.flops) / timer.window_s
    row = {
        "preset": args.preset, "params": count_parameters(module.model), "layers": margs.n_layers, "dim": margs.dim,
        "batch": args.batch, "clip": f"{frames} frames {w}x{h}", "tokens_per_sample": tokens,
        "text": text, "text_tokens": sorted({len(c.encode()) + 2 for c in step_captions}), "trim_text": trim_text,
        "key_mask": any(timer.masked), "graphs_compiled_in_timed_steps": timer.graphs_compiled_timed,
        "activation_checkpointing": args.ac, "compile": args.compile, "float8": float8,
        "float8_layers": sum(type(m).__name__ == "Float8Linear" for m in module.model.modules()), "attention": args.attention,
        "steps_timed": len(timer.flops), "step_s": step_s, "timing": "window", "first_step_s": timer.first_step_s,
        "tokens_per_s": sum(timer.tokens) / timer.window_s, "model_flops_per_step": statistics.median(timer.flops),
        "model_tflops_per_s": float(f"{flops_per_s / 1e12:.4g}"),
        # against the H100's dense bf16 peak and the reference block: meaningless on a CPU
        "mfu": round(flops_per_s / H100_BF16_DENSE_FLOPS, 4) if device.type == "cuda" else None,
        "of_reference_block": round(flops_per_s / 1e12 / args.reference_block_tflops, 4) if device.type == "cuda" else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    if profiler is not None:
        row["profile"] = {"clock": "GPU" if device.type == "cuda" else "CPU", "total_ms": profiler.total_ms, "top": profiler.rows}
        if profiler.host is not None:
            row["profile"]["host"] = profiler.host
            row["profile"]["host_syncs"] = profiler.syncs
        if profiler.error:
            row["profile"]["error"] = profiler.error
        else:
            print(profile_table(row["profile"]))
    del module, trainer
    gc.collect()  # trainer <-> module and block <-> compiled forward are cycles: free the EMA and states before the next case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| preset | layers | tokens | text | AC | compile | float8 | step s | first step s | tokens/s | model TFLOP/s | MFU (989) | of ref. block | peak GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    for r in rows:
        mask = "key mask" if r["key_mask"] else "no mask"
        lengths = r["text_tokens"]
        text_tokens = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        trimmed = ", trimmed" if r["trim_text"] else ""
        lines.append(f"| {r['preset']} | {r['layers']} | {r['batch']} x {r['tokens_per_sample']} | {r['text']}: {text_tokens}{trimmed} ({mask}) | "
                     f"{r['activation_checkpointing']} | {r['compile']} | {r['float8']} | {r['step_s']:.4f} | {r['first_step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['model_tflops_per_s']:.3g} | "
                     f"{pct(r['mfu'])} | {pct(r['of_reference_block'])} | {r['peak_memory_gb'] or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="proxy")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768], help="target tokens per sample (the clip is sized to it)")
    p.add_argument("--frames", type=int, default=16, help="video frames per clip (the frame size follows from --tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=12, help="untimed steps first (compilation, allocator; varied: each of its lengths)")
    p.add_argument("--text", choices=CAPTIONS, nargs="+", default=["varied"],
                   help="caption variants, each run at each token count (default: varied, as a long training run runs; "
                        "every clip of a batch gets the step's caption, so no batch has a mask but padded's)")
    p.add_argument("--ac", choices=AC_MODES, default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--float8", choices=FLOAT8_RECIPES, nargs="+", default=["none"],
                   help="FP8 block matmuls (train/float8.py), each recipe its own case (e.g. none tensorwise rowwise)")
    p.add_argument("--attention", nargs="+", default=list(DEFAULT_ATTENTION_ORDER))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step (torch.profiler): its top operators by self time go "
                        "into the json (\"profile\") and the log")
    p.add_argument("--reference-block-tflops", type=float, default=REFERENCE_BLOCK_TFLOPS,
                   help="the reference block's training TFLOP/s on this card (../shared/bench/reference_block.py; "
                        "default: the H100's); bench/device/check.sh measures it in the same lease")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1: the first step (compilation) is timed on its own, outside the window")
    if "varied" in args.text and args.warmup < len(VARIED):
        p.error(f"--text varied needs --warmup >= {len(VARIED)}: the warm-up sees each of its lengths once, so the timed "
                "steps run shapes already seen (new ones: --text fresh)")
    if args.compile and "fresh" in args.text and args.warmup < 2:
        p.error("--text fresh with --compile needs --warmup >= 2: its second step compiles the dynamic-shape graph")
    if "fresh" in args.text and args.warmup + args.steps + args.profile > len(FRESH):
        p.error(f"--text fresh has {len(FRESH)} caption lengths: --warmup + --steps (+ 1 with --profile) must not exceed that")
    device = torch.device(args.device)
    result = {"benchmark": "train_step", **describe(device, ["bench/train_step.py", *(sys.argv[1:] if argv is None else argv)]),
              "peak_flops": H100_BF16_DENSE_FLOPS, "reference_block_tflops": args.reference_block_tflops, "results": []}
    stem = f"train_step_{slug(device)}_{result['date']}{args.tag}"
    for n in args.tokens:
        for text in args.text:
            for float8 in args.float8:
                result["results"].append(run_case(args, n, text, float8, device))
                write(result, args.out, stem, table(result["results"]))
    return result


if __name__ == "__main__":
    main()
