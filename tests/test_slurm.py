"""The project's own SLURM launch on a real single-host SLURM (launch/local_slurm.sh installs and
starts one): launch/slurm.py writes and sbatches the job for 2 CPU tasks (+cluster=cpu2, ZeRO-2),
the job trains and checkpoints, `scancel --signal=USR1` makes it save, requeue itself and resume,
and it ends at max_steps in the same W&B run. Skipped where SLURM cannot be started (not root and
not installed, no package registry)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_pretrain_e2e import ROOT, losses
from tests.test_pretrain_e2e import shards  # noqa: F401  (module fixture: 4 shards for 2 ranks)

STEPS = 40
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]  # installing slurm-wlm takes a while


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    script = ROOT / "launch" / "local_slurm.sh"
    out = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.skip(f"no single-host SLURM here: {out.stderr.strip()[-300:]}")
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    yield env
    subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, timeout=60)


def sh(env, *args, check=True) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert out.returncode == 0, (args, out.stderr)
    return out.stdout.strip()


def job_state(env, job: str) -> str:
    """PENDING/RUNNING/... while queued, '' once it has left the queue."""
    return sh(env, "squeue", "-h", "-j", job, "-o", "%T", check=False)


def test_sbatch_train_preempt_requeue_resume(slurm, shards, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = [
        "+cluster=cpu2", "data.synthetic=null", f"data.loader.shards={shards}", "data.loader.clip_seconds=1.0",
        "data.loader.fps=8", "data.loader.sample_rate=8000", "data.loader.buckets=[[1:1,16,16]]", "data.loader.batch_size=2",
        "codec.video_pool=true", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=2", "sample.steps=2", "sample.seconds=1.0",
        "sample.height=16", "sample.width=16",
    ]
    out = subprocess.run([sys.executable, "launch/slurm.py", "pretrain", "--run-dir", str(run_dir), "--submit", *overrides],
                         cwd=ROOT, capture_output=True, text=True, env={**slurm, "WANDB_MODE": "offline"}, timeout=300)
    assert out.returncode == 0, out.stderr
    job = (run_dir / "slurm_job_id").read_text().strip()
    log = run_dir / f"slurm-{job}.out"

    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "epoch=0-step=4.ckpt").exists():  # trained and checkpointed
        assert time.time() < deadline and job_state(slurm, job), log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    sh(slurm, "scancel", "--signal=USR1", job)  # what --signal=USR1@<s> does before the time limit

    requeued, gone = False, 0
    # Done when the job has left the queue for several polls in a row: a busy slurmctld can make
    # one squeue miss it (seen while requeueing, with the rest of the suite running).
    while gone < 5:
        assert time.time() < deadline, log.read_text()[-3000:]
        if not requeued and "requeueing job" in log.read_text():
            requeued = True
            # SLURM holds a requeued batch job back for a while (BeginTime); no need to wait here
            sh(slurm, "scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        gone = 0 if job_state(slurm, job) else gone + 1
        time.sleep(1)
    text = log.read_text()
    assert "SIGUSR1: saving" in text and "requeueing job" in text, text[-3000:]
    assert f"job {job} restart 1" in text, text[-3000:]  # it ran again
    assert "run directory:" in text  # ...to the end

    steps = losses(run_dir)
    assert sorted(steps) == list(range(STEPS))  # every step once: resumed where it stopped
    assert len(list((run_dir / "metrics").glob("version_*"))) == 2  # two launches...
    runs = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert runs == {(run_dir / "wandb_run_id").read_text().strip()}  # ...one W&B run
    assert (run_dir / "export" / "model.safetensors").is_file() and not (run_dir / "preempted").exists()
