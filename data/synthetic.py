"""The built-in dataset: clips of moving shapes whose bounces, collisions and appearances make
sounds at exactly those instants, captioned in several languages, written through real codecs
(h264 + AAC in MP4) into WebDataset shards. The same config and seed give the same clips.

    python -m data.synthetic --out artifacts/synthetic --num-clips 64
"""

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time

import numpy as np
import webdataset as wds

from data.atomic import written_whole
from data.config import SyntheticConfig
from data.encode import encode_av
from data.synthetic_captions import caption
from data.synthetic_scene import Scene, make_scene, render_audio, render_frame


def clip_meta(cfg: SyntheticConfig, index: int, scene: Scene) -> dict:
    """The sample's json: what the loader reads (captions, rates, sizes) and the ground truth
    that evaluation needs (event times, what is on screen and heard)."""
    shapes = [{"shape": shape, "colour": colour} for shape, colour in scene.shapes]
    return {
        "captions": {lang: caption(lang, scene.motion, scene.shapes, scene.sound) for lang in cfg.languages},
        "languages": list(cfg.languages),
        "fps": cfg.fps,
        "duration": scene.num_frames / cfg.fps,
        "width": cfg.width,
        "height": cfg.height,
        "audio_sample_rate": cfg.sample_rate,
        "audio_channels": cfg.audio_channels,
        "source": "synthetic",
        "seed": cfg.seed,
        "clip_index": index,
        "motion": scene.motion,
        "shapes": shapes,
        "sound": scene.sound,
        "events": [dict(event, sample=round(event["time"] * cfg.sample_rate)) for event in scene.events],
    }


def synthetic_clip(cfg: SyntheticConfig, index: int) -> tuple[bytes, dict]:
    """(mp4 bytes, json meta) of clip `index`; depends only on (cfg, index)."""
    rng = np.random.default_rng([cfg.seed, index])
    scene = make_scene(cfg.width, cfg.height, cfg.fps, cfg.seconds, rng)
    audio = render_audio(scene, scene.num_frames / cfg.fps, cfg.sample_rate, cfg.audio_channels, rng)

    def frames():
        for k in range(scene.num_frames):
            image = render_frame(scene, k)
            if cfg.noise_std > 0:
                noise = rng.standard_normal(image.shape, dtype=np.float32) * cfg.noise_std
                image = np.clip(image + noise, 0, 255).astype(np.uint8)
            yield image

    buffer = io.BytesIO()
    encode_av(buffer, frames(), cfg.fps, audio, cfg.sample_rate, crf=cfg.crf, audio_bitrate=cfg.audio_bitrate)
    return buffer.getvalue(), clip_meta(cfg, index, scene)


SYNTHETIC_RECORD = "synthetic.json"  # the SyntheticConfig a directory's set was written with


def synthetic_shard_paths(cfg: SyntheticConfig, out_dir: str) -> list[str]:
    """The shards cfg makes: out_dir/<prefix>-NNNNNN.tar, cfg.clips_per_shard clips each."""
    return [os.path.join(out_dir, f"{cfg.prefix}-{i:06d}.tar") for i in range(math.ceil(cfg.num_clips / cfg.clips_per_shard))]


def write_synthetic_shards(cfg: SyntheticConfig, out_dir: str, only_missing: bool = False) -> list[str]:
    """Write cfg.num_clips clips into synthetic_shard_paths(cfg, out_dir); with only_missing, the
    shards not there yet (a write that was cut short goes on). Each file is written whole
    (data/atomic.py): a reader never sees half a shard, and ranks that write the same
    (deterministic) set at once do not collide. Returns the shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = synthetic_shard_paths(cfg, out_dir)
    # What the set is made from, before any shard: train/datamodule.prepare_synthetic completes a
    # set only if it was begun with the same config.
    with written_whole(os.path.join(out_dir, SYNTHETIC_RECORD)) as partial, open(partial, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    for shard, path in enumerate(paths):
        if only_missing and os.path.exists(path):
            continue
        with written_whole(path) as partial, wds.TarWriter(partial, mtime=0) as tar:  # fixed mtime: same seed, same bytes
            first = shard * cfg.clips_per_shard
            for index in range(first, min(first + cfg.clips_per_shard, cfg.num_clips)):
                media, meta = synthetic_clip(cfg, index)
                tar.write({"__key__": f"{cfg.prefix}_{index:06d}", "mp4": media,
                           "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    return paths


def _parser() -> argparse.ArgumentParser:
    """One --option per SyntheticConfig field (lists comma-separated), so the CLI never lags the config."""
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the shards into")
    for f in dataclasses.fields(SyntheticConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s: s.split(","), default=default,
                                help=f"comma-separated (default {','.join(default)})")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default,
                                help=f"(default {default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    out = args.pop("out")
    cfg = SyntheticConfig(**args)
    began = time.perf_counter()
    paths = write_synthetic_shards(cfg, out)
    print(f"wrote {cfg.num_clips} clips into {len(paths)} shards in {out} ({time.perf_counter() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
