"""`python -m train pretrain` end to end on a tiny synthetic set: checkpoints, a W&B offline run
with the metrics, an mp4 with audio, exact resume, and `python -m train sample` on the export."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest

from data.config import SyntheticConfig
from train.checkpoint import read_weights
from data.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parent.parent
FPS, SECONDS, SR = 8, 1.0, 8000


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    # 4 shards: enough for 2 ranks (tests/test_zero.py, tests/test_slurm.py)
    write_synthetic_shards(SyntheticConfig(num_clips=16, seconds=1.5, fps=24, width=32, height=32, sample_rate=16000, clips_per_shard=4), out)
    return out


def run_overrides(shards: Path, max_steps: int) -> list[str]:
    """The overrides every end-to-end test's run starts from (pretrain, distill, ZeRO, preemption,
    SLURM): the tiny synthetic shards as 16x16 clips of 1 s, 2 a batch, a log line every step, a
    checkpoint every 2, samples of 2 steps."""
    return [
        "data.synthetic=null", f"data.loader.shards={shards}", f"data.loader.clip_seconds={SECONDS}",
        f"data.loader.fps={FPS}", f"data.loader.sample_rate={SR}", "data.loader.buckets=[[1:1,16,16]]",
        "data.loader.batch_size=2", f"trainer.max_steps={max_steps}", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=2",
        "sample.steps=2", f"sample.seconds={SECONDS}", "sample.height=16", "sample.width=16",
    ]


def pretrain(run_dir: Path, shards: Path, max_steps: int, *extra: str):
    args = [
        sys.executable, "-m", "train", "pretrain", f"hydra.run.dir={run_dir}", *run_overrides(shards, max_steps),
        # the EMA folded every 3 steps: a fold in the 4-step runs, and a resume at step 2 between folds
        "data.loader.num_workers=0", "optimizer.warmup_steps=2", "ema_every_n_steps=3", *extra,
    ]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**_env(), "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _env():
    import os

    return dict(os.environ)


def metric(run_dir: Path, key: str) -> dict[int, float]:
    """step -> the metric `key` from every CSV log of the run (one version per launch)."""
    found = {}
    for path in sorted((run_dir / "metrics").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    found[int(row["step"])] = float(row[key])
    return found


def losses(run_dir: Path) -> dict[int, float]:
    return metric(run_dir, "train/loss")


def test_pretrain_end_to_end_then_resume_exactly(shards, tmp_path):
    straight = tmp_path / "straight"
    out = pretrain(straight, shards, 4, "peak_flops=1e12")  # a peak to divide by on CPU: perf/mfu gets logged
    # the end-of-run work is timed in the log: the samples (also the step-2 ones), then the export
    log = out.stdout + out.stderr
    assert re.search(r"samples at step 4: 1 clip \(samples/generator\) in [\d.]+ s", log), log[-2000:]
    assert re.search(r"export: \S+model\.safetensors \(ema weights, step 4\) in [\d.]+ s", log), log[-2000:]
    # checkpoints every 2 steps and last
    ckpts = {p.name for p in (straight / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any("step=2" in c for c in ckpts) and any("step=4" in c for c in ckpts)
    # a W&B offline run holding the metrics
    runs = list((straight / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"train/loss", b"train/loss_video", b"train/loss_audio", b"train/grad_norm", b"train/lr",
                b"perf/tokens_per_sec", b"perf/samples_per_sec", b"perf/tflops_per_sec", b"perf/mfu", b"samples/generator"):
        assert key in blob, key
    # the FLOPs of the model built in configure_model are counted (the hook finds it)
    assert metric(straight, "perf/tflops_per_sec") and all(v > 0 for v in metric(straight, "perf/tflops_per_sec").values())
    # the end-of-training sample: an mp4 with the right frame count and audio duration
    mp4 = sorted((straight / "samples").glob("*.mp4"))[-1]
    with av.open(str(mp4)) as c:
        assert c.streams.video[0].frames == round(SECONDS * FPS)
        assert len(c.streams.audio) == 1
        audio = c.streams.audio[0]
        assert abs(float(audio.duration * audio.time_base) - SECONDS) < 1024 / audio.sample_rate + 1e-6
    info = json.loads(mp4.with_suffix(".json").read_text())
    assert info["steps"] == 2 and info["seed"] == 0
    assert (straight / "export" / "model.safetensors").is_file()

    # interrupted at step 2, resumed to 4 in the same run directory
    resumed = tmp_path / "resumed"
    pretrain(resumed, shards, 2)
    pretrain(resumed, shards, 4, "keep_checkpoints=1")
    # the newest periodic checkpoint only: step 2's, written before the restart and before
    # keep_checkpoints was set, removed after it; last.ckpt re-saved under its own name
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == [0, 1, 2, 3] and sorted(b) == [0, 1, 2, 3]
    for step in (2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    # the EMA, resumed between two folds (its fold count in the checkpoint), exports the same weights
    ema_a, ema_b = (read_weights(run / "export" / "model.safetensors")[0] for run in (straight, resumed))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) < 1e-5
    assert (resumed / "wandb_run_id").read_text() == (resumed / "wandb_run_id").read_text().strip()
    assert len(list((resumed / "wandb").glob("offline-run-*"))) >= 1

    # sampling from the export
    out = tmp_path / "x.mp4"
    res = subprocess.run(
        [sys.executable, "-m", "train", "sample", f"ckpt={straight / 'export' / 'model.safetensors'}", "prompt=a red ball",
         "steps=3", "cfg=3.0", "seed=1", f"seconds={SECONDS}", "height=16", "width=16", f"out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == round(SECONDS * FPS) and len(c.streams.audio) == 1
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["network_evaluations"] == 6 and info["cfg_video"] == 3.0 and info["prompt"] == "a red ball"
