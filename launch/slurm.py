"""Write (and optionally submit) the SLURM batch script of a training run from a cluster preset.

    python launch/slurm.py pretrain +cluster=h100x64 [hydra overrides] [--run-dir runs/x] [--submit]
    python launch/slurm.py distill +cluster=h100x8 teacher=runs/x/export/model.safetensors --submit

The preset (conf/cluster/<name>.yaml) gives nodes, tasks (one per GPU) and CPUs per task, time
limit, partition and how long before the limit SLURM sends SIGUSR1. The script runs
`srun python -m train <stage> ...` so every task is one rank; Lightning reads the rendezvous from
SLURM's variables (SLURMEnvironment: SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, the first host of
SLURM_JOB_NODELIST as the main address). On SIGUSR1 the ranks save checkpoints/last.ckpt, mark
the run directory and exit cleanly (train/preemption.py); the script then requeues the job, and
the fixed run directory in it makes the restarted job resume there (resume=auto) with the same
W&B run.
"""

import argparse
import datetime
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("pretrain", "distill")


def compose(stage: str, overrides: list[str]):
    """The run's config as `python -m train` would compose it (the preset's values resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=stage, overrides=overrides)


def render(stage: str, overrides: list[str], run_dir: Path, python: str = sys.executable) -> str:
    """The sbatch script text for `python -m train <stage> <overrides>` in run_dir."""
    from train.cluster import ClusterConfig
    from train.stages import to_object

    cfg = compose(stage, overrides)
    if cfg.get("cluster") is None:
        raise SystemExit("error: pass a cluster preset, e.g. +cluster=h100x64 (conf/cluster/)")
    cluster, trainer = to_object(ClusterConfig, cfg.cluster, "cluster"), cfg.trainer
    nodes, per_node = int(trainer.num_nodes), int(trainer.devices)
    gpu = trainer.get("accelerator") in ("gpu", "cuda")
    lines = [
        "#!/bin/bash",
        f"# {stage} with +cluster={cluster.name}, written by launch/slurm.py on {datetime.date.today().isoformat()}",
        f"#SBATCH --job-name=avgen-{stage}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={per_node}",
        f"#SBATCH --cpus-per-task={int(cluster.cpus_per_task)}",
        f"#SBATCH --time={cluster.slurm_time}",
        f"#SBATCH --signal=USR1@{int(cluster.slurm_signal_seconds)}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
    ]
    if gpu:
        lines.append(f"#SBATCH --gpus-per-node={per_node}")
    if cluster.slurm_partition:
        lines.append(f"#SBATCH --partition={cluster.slurm_partition}")
    args = [python, "-m", "train", stage, *overrides, f"hydra.run.dir={run_dir}"]
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(ROOT))}",
        'export WANDB_MODE="${WANDB_MODE:-offline}"',
        f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{int(cluster.cpus_per_task)}}}"',
        "# restarts (requeue after SIGUSR1, or a node failure) land here again and resume from",
        "# <run_dir>/checkpoints (resume=auto)",
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        # --cpus-per-task again: srun of SLURM 22.05-23.02 does not take it from the allocation,
        # and each rank would get one CPU for its loader workers
        f"srun --kill-on-bad-exit=1 --cpus-per-task={int(cluster.cpus_per_task)} " + " ".join(shlex.quote(a) for a in args),
        "# SIGUSR1 (time limit near, or preemption): the run saved last.ckpt, wrote this marker and",
        "# exited cleanly; requeue so the job starts again and resumes",
        f"if [ -f {shlex.quote(str(run_dir / 'preempted'))} ]; then",
        f'  echo "preempted ($(cat {shlex.quote(str(run_dir / "preempted"))})): requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--run-dir", default=None, help="default: runs/<stage>/<date_time>")
    parser.add_argument("--submit", action="store_true", help="sbatch the script (else only write it)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for `python -m train <stage>`, with +cluster=<preset>")
    args, rest = parser.parse_known_args(argv)  # overrides may come before or after the options
    args.overrides = [*args.overrides, *rest]
    run_dir = Path(args.run_dir or ROOT / "runs" / args.stage / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "job.sbatch"
    script.write_text(render(args.stage, args.overrides, run_dir))
    print(f"wrote {script}")
    if args.submit:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"error: sbatch failed: {out.stderr.strip()}", file=sys.stderr)
            return 2
        job = out.stdout.strip().split(";")[0]
        (run_dir / "slurm_job_id").write_text(job)
        print(f"submitted job {job}; log: {run_dir}/slurm-{job}.out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
