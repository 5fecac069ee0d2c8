"""Preemption and faults: SIGUSR1/SIGTERM mid-run write checkpoints/last.ckpt and end the run
cleanly (no export: training is not over), `kill -9` loses only the steps since the last
checkpoint, and the restarted run resumes at the right step with the losses of an uninterrupted
run, in the same W&B run."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_pretrain_e2e import ROOT, losses, run_overrides, shards  # noqa: F401  (module fixture)
from train.checkpoint import read_weights

STEPS = 30


def args(run_dir: Path, shards: Path) -> list[str]:  # noqa: F811
    return [
        sys.executable, "-m", "train", "pretrain", f"hydra.run.dir={run_dir}", *run_overrides(shards, STEPS),
        "data.loader.num_workers=0", "codec.video_pool=true",
    ]


def run(run_dir, shards):  # noqa: F811
    out = subprocess.run(args(run_dir, shards), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def start_and_interrupt(run_dir: Path, shards: Path, sig: int):  # noqa: F811
    """Start a run, wait for its first checkpoint, send `sig`, wait for it to end."""
    proc = subprocess.Popen(args(run_dir, shards), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run_dir / "checkpoints" / "epoch=0-step=2.ckpt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("straight")
    run(run_dir, shards)
    return run_dir


def losses_of(csv_path: Path) -> dict[int, float]:
    with open(csv_path) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def last_step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_saves_stops_cleanly_and_resumes_exactly(sig, shards, straight, tmp_path):  # noqa: F811
    run_dir = tmp_path / "preempted"
    code, stdout, stderr = start_and_interrupt(run_dir, shards, sig)
    assert code == 0, stderr[-3000:]
    assert f"{signal.Signals(sig).name}: saving" in stdout
    stopped = last_step(run_dir)
    assert 2 <= stopped < STEPS
    assert not (run_dir / "export").exists()  # not the end of training: no export, no final sample
    run_id = (run_dir / "wandb_run_id").read_text()

    run(run_dir, shards)  # the scheduler's restart: same command, same run directory
    assert last_step(run_dir) == STEPS
    assert (run_dir / "wandb_run_id").read_text() == run_id
    a, b = losses(straight), losses(run_dir)
    assert sorted(b) == list(range(STEPS))
    for step in range(STEPS):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, stopped)
    wa, wb = (read_weights(d / "export" / "model.safetensors")[0] for d in (straight, run_dir))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(shards, straight, tmp_path):  # noqa: F811
    run_dir = tmp_path / "killed"
    code, _, _ = start_and_interrupt(run_dir, shards, signal.SIGKILL)
    assert code == -signal.SIGKILL
    periodic = [int(p.stem.split("step=")[1]) for p in (run_dir / "checkpoints").glob("epoch=*-step=*.ckpt")]
    assert periodic and max(periodic) < STEPS  # resume=auto takes the newest checkpoint
    run(run_dir, shards)
    # what the restarted launch trained: from the newest checkpoint to the end, each step once
    restarted = losses_of(run_dir / "metrics" / "version_1" / "metrics.csv")
    first = min(restarted)
    # the newest checkpoint: last.ckpt and the newest periodic one hold the same step
    assert sorted(restarted) == list(range(first, STEPS)) and first == max(periodic), (first, periodic)
    a = losses(straight)
    for step, value in restarted.items():
        assert value == pytest.approx(a[step], rel=1e-5, abs=1e-6), step  # ...to the same losses
