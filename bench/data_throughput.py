"""Decoding throughput of the data pipeline on the CPU: clips per second for ONE worker process,
720p 5 s source clips (h264 + 48 kHz AAC in MP4) decoded to 24 fps video in the 16:9 720p bucket
plus 16 kHz or 44.1 kHz mono audio.

    python bench/data_throughput.py [--clips 4] [--source-fps 30] [--noise-std 4]

Three numbers per audio rate:
  decode        decode_sample() in this process, one FFmpeg thread: the decoding one worker does per clip;
  loader f32    build_loader(num_workers=1) seen from the main process: decoding plus building the
                float32 batch (3 x 120 x 720 x 1280 x 4 B = 1.3 GB per clip) in shared memory;
  loader u8     the same with video_uint8=True (330 MB per clip; normalise on the GPU).
Writes bench/results/data_throughput_<date>.json and prints a table.
"""

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time

import av
import numpy as np
import torch
import torchaudio
import webdataset

from data.config import LoaderConfig, SyntheticConfig
from data.decode import ClipSpec
from data.loader import build_loader
from data.sample import decode_sample
from data.shard_reader import shard_samples
from data.synthetic import write_synthetic_shards

CLIP_SECONDS = 5.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_source(out_dir: str, clips: int, fps: int, noise_std: float) -> tuple[list[str], dict]:
    cfg = SyntheticConfig(num_clips=clips, seconds=CLIP_SECONDS, fps=fps, width=1280, height=720, sample_rate=48000,
                          clips_per_shard=clips, noise_std=noise_std, audio_bitrate=128000, prefix="bench")
    began = time.perf_counter()
    paths = write_synthetic_shards(cfg, out_dir)
    media_bytes = sum(ref["mp4"].size for ref in shard_samples(paths[0]))
    return paths, {
        "clips": clips, "width": 1280, "height": 720, "fps": fps, "seconds": CLIP_SECONDS, "video": "h264 (libx264 crf 23)",
        "audio": "aac 48 kHz mono 128 kb/s", "container": "mp4", "noise_std": noise_std,
        "mean_bitrate_mbps": round(media_bytes * 8 / (clips * CLIP_SECONDS) / 1e6, 2),
        "generate_seconds": round(time.perf_counter() - began, 1),
    }


def loader_config(shards: str, sample_rate: int, video_uint8: bool = False) -> LoaderConfig:
    return LoaderConfig(shards=shards, clip_seconds=CLIP_SECONDS, fps=24, sample_rate=sample_rate, resolution=720,
                        batch_size=1, shuffle_buffer=1, num_workers=1, prefetch_factor=2, decode_threads=1,
                        video_uint8=video_uint8)


def bench_decode(shard: str, cfg: LoaderConfig, repeats: int) -> float:
    """Clips per second of decode_sample in this process."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    spec = ClipSpec.from_config(cfg)
    raws = [raw for raw in shard_samples(shard)]
    decode_sample(raws[0], spec, random.Random(0))  # warm-up
    began = time.perf_counter()
    for i in range(repeats):
        for raw in raws:
            sample = decode_sample(raw, spec, random.Random(i))
            assert sample["video"].shape == (120, 720, 1280, 3)
    return repeats * len(raws) / (time.perf_counter() - began)


def bench_loader(cfg: LoaderConfig, batches: int) -> float:
    """Clips per second arriving in the main process from one worker process."""
    iterator = iter(build_loader(cfg, 0, 1))
    batch = next(iterator)  # warm-up: worker start and first decode
    assert batch["video"].shape == (1, 3, 120, 720, 1280) and batch["audio"].shape[-1] == cfg.num_audio_samples
    began = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - began
    del iterator
    return batches / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4, help="source clips to generate")
    parser.add_argument("--source-fps", type=int, default=30)
    parser.add_argument("--noise-std", type=float, default=9.0, help="picture noise; 9 gives ~9 Mb/s, a camera-like bitrate")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the clips in the decode benchmark")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = make_source(tmp, args.clips, args.source_fps, args.noise_std)
        print(f"source: {args.clips} clips 1280x720 {args.source_fps} fps {CLIP_SECONDS} s, "
              f"{source['mean_bitrate_mbps']} Mb/s, generated in {source['generate_seconds']} s")
        for rate in (16000, 44100):
            cfg = loader_config(paths[0], rate)
            decode = bench_decode(paths[0], cfg, args.repeats)
            loader = bench_loader(cfg, args.clips * args.repeats)
            loader_uint8 = bench_loader(loader_config(paths[0], rate, video_uint8=True), args.clips * args.repeats)
            rows.append({"audio_rate": rate, "decode_clips_per_s": round(decode, 3),
                         "loader_float32_clips_per_s": round(loader, 3), "loader_uint8_clips_per_s": round(loader_uint8, 3)})

    result = {
        "benchmark": "data_throughput",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python bench/data_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "torchaudio": torchaudio.__version__, "av": av.__version__,
                     "ffmpeg": av.ffmpeg_version_info, "webdataset": webdataset.__version__, "numpy": np.__version__},
        "source": source,
        "output": {"fps": 24, "frames": 120, "bucket": "16:9 1280x720", "video": "(3, T, H, W) float32 in [-1, 1] or uint8",
                   "audio_channels": 1, "decode_threads": 1, "worker_processes": 1},
        "results": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"data_throughput_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\n{'audio rate':>10} | {'decode clips/s':>14} | {'loader f32 clips/s':>18} | {'loader u8 clips/s':>17}")
    for row in rows:
        print(f"{row['audio_rate']:>10} | {row['decode_clips_per_s']:>14.3f} | {row['loader_float32_clips_per_s']:>18.3f} | "
              f"{row['loader_uint8_clips_per_s']:>17.3f}")
    print(f"\n{result['machine']['cpu']}, {result['machine']['cores']} cores; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
