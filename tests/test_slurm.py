"""The project's own SLURM launch on a real single-host SLURM (launch/local_slurm.sh installs and
starts one): launch/slurm.py writes and sbatches the job for 2 CPU tasks (+cluster=cpu2, ZeRO-2),
the job trains and checkpoints, `scancel --signal=USR1` makes it save, requeue itself and resume,
and it ends at max_steps in the same W&B run. Skipped where SLURM cannot be started (not root and
not installed, no package registry)."""

import os
import subprocess
import sys
import time

import pytest

from tests.test_pretrain_e2e import ROOT, losses, run_overrides
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


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def job_info(env, job: str) -> dict[str, str]:
    """The job's fields as slurmctld reports them (JobState, Restarts, ...; kept for MinJobAge,
    300 s, after the job ends); {} when slurmctld does not answer this time (busy)."""
    out = sh(env, "scontrol", "-o", "show", "job", job, check=False)
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_sbatch_train_preempt_requeue_resume(slurm, shards, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = [
        "+cluster=cpu2", *run_overrides(shards, STEPS), "codec.video_pool=true",
    ]
    out = subprocess.run([sys.executable, "launch/slurm.py", "pretrain", "--run-dir", str(run_dir), "--submit", *overrides],
                         cwd=ROOT, capture_output=True, text=True, env={**slurm, "WANDB_MODE": "offline"}, timeout=300)
    assert out.returncode == 0, out.stderr
    job = (run_dir / "slurm_job_id").read_text().strip()
    log = run_dir / f"slurm-{job}.out"

    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "epoch=0-step=4.ckpt").exists():  # trained and checkpointed
        ended = job_info(slurm, job).get("JobState") in ENDED
        assert time.time() < deadline and not ended, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    sh(slurm, "scancel", "--signal=USR1", job)  # what --signal=USR1@<s> does before the time limit

    # Done when the job's second run has started (its log line) and slurmctld reports the job
    # ended. Neither alone will do: while requeueing, the job briefly leaves squeue's list and
    # scontrol shows it in an ended state, with its restart already counted (both seen here).
    ended_since, hurried = None, False
    while True:
        assert time.time() < deadline, log.read_text()[-3000:]
        info = job_info(slurm, job)
        restarts = int(info.get("Restarts", "0"))
        restarted = f"job {job} restart 1" in log.read_text()
        if restarted and info.get("JobState") in ENDED:
            break
        if info.get("JobState") in ENDED and restarts >= 1 and not restarted:
            # ended after the requeue without running again: fail now, with SLURM's reason
            ended_since = ended_since or time.time()
            assert time.time() - ended_since < 20, f"the requeued job ended without a second run: {info}"
        else:
            ended_since = None
        if info.get("JobState") == "PENDING" and restarts >= 1 and not hurried:
            # SLURM holds a requeued batch job back for a while (BeginTime); no need to wait that
            # long, but not "now" either: slurmd refuses a launch in the same second as the
            # first run's credential was revoked ("Job credential revoked", seen in CI). Once:
            # each update would move the start again.
            sh(slurm, "scontrol", "update", f"JobId={job}", "StartTime=now+3", check=False)
            hurried = True
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
