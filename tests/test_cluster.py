"""Cluster presets, the checks made before any process group starts (GPUs, launcher variables,
memory per GPU), the memory arithmetic, and the SLURM script launch/slurm.py writes."""

import subprocess
import sys
from pathlib import Path

import pytest

from model import ModelArgs
from train.cluster import ClusterConfig, check_launch, check_memory
from train.config import ConfigError
from train.memory import GIB, estimate_per_gpu

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import slurm  # noqa: E402

HH15B = 14_970_000_000  # conf/model/hh15b.yaml, counted on the meta device (README)
H100 = ClusterConfig(name="h100x64", gpu_memory_gb=80)
TOKENS_5S_1080P = 63_000


def test_memory_arithmetic_by_hand():
    n = 1_000_000_000
    est = estimate_per_gpu(n, n_layers=10, dim=1000, tokens_per_micro_batch=1000, zero_stage=2, data_parallel=4,
                           precision="bf16-mixed", ema=True, activation_checkpointing=True)
    assert est.weights == pytest.approx(2 * n / GIB)  # replicated under stage 2
    assert est.gradients == pytest.approx(2 * n / 4 / GIB)
    assert est.optimizer == pytest.approx(12 * n / 4 / GIB)
    assert est.ema == pytest.approx(4 * n / GIB)  # follows the weights
    assert est.activations == pytest.approx((10 * 2 * 1000 * 1000 + 34 * 1000 * 1000) / GIB)
    stage3 = estimate_per_gpu(n, 10, 1000, 1000, 3, 4)
    assert stage3.weights == pytest.approx(est.weights / 4) and stage3.ema == pytest.approx(est.ema / 4)
    fp32 = estimate_per_gpu(n, 10, 1000, 1000, 0, 1, precision="32-true", ema=False)
    assert (fp32.weights, fp32.gradients, fp32.optimizer, fp32.ema) == pytest.approx((4 * n / GIB, 4 * n / GIB, 8 * n / GIB, 0))


def test_15b_on_64_h100_needs_zero3():
    """The presets' choice (docs/training.md): ZeRO-2 keeps 30 GB of bf16 weights and a 60 GB fp32
    EMA on every GPU, ZeRO-3 spreads them; with activation checkpointing a 5 s 1080p clip fits."""
    trainer = {"devices": 8, "num_nodes": 8}
    args = ModelArgs(dim=5120, n_heads=40, n_kv_heads=8, mlp_hidden=10752, n_modality_in=4, n_shared=32, n_modality_out=4)
    common = dict(n_params=HH15B, n_layers=args.n_layers, dim=args.dim, tokens=TOKENS_5S_1080P, trainer_cfg=trainer,
                  precision="bf16-mixed", ema=True, activation_checkpointing=True)
    with pytest.raises(ConfigError, match=r"cluster=h100x64: 14.97B parameters with ZeRO-2 over 64 GPUs .* more than its 80 GB"):
        check_memory(H100, zero_stage=2, **common)
    check_memory(H100, zero_stage=3, **common)  # fits
    with pytest.raises(ConfigError, match="ZeRO-3"):  # ...but not without activation checkpointing
        check_memory(H100, zero_stage=3, **{**common, "activation_checkpointing": False})
    check_memory(ClusterConfig(name="local"), zero_stage=0, **common)  # gpu_memory_gb 0: not checked


def test_launch_checks_name_what_is_missing():
    cluster = ClusterConfig(name="h100x64")
    multi = {"accelerator": "cpu", "devices": 8, "num_nodes": 8}
    with pytest.raises(ConfigError, match="num_nodes=8 needs a multi-node launcher.*missing RANK, WORLD_SIZE"):
        check_launch(cluster, multi, environ={})
    slurm_env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "avgen", "SLURM_NTASKS": "64", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-8]"}
    check_launch(cluster, multi, environ=slurm_env)
    with pytest.raises(ConfigError, match="SLURM_PROCID not set: start the ranks with srun"):
        check_launch(cluster, multi, environ={k: v for k, v in slurm_env.items() if k != "SLURM_PROCID"})
    with pytest.raises(ConfigError, match="= 64 processes, but SLURM started 16 tasks"):
        check_launch(cluster, multi, environ={**slurm_env, "SLURM_NTASKS": "16"})
    torchrun_env = {"RANK": "3", "WORLD_SIZE": "64", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    check_launch(cluster, multi, environ=torchrun_env)


def test_gpu_preset_on_a_machine_without_them_is_one_line(tmp_path):
    import torch

    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has 8 GPUs")
    out = subprocess.run([sys.executable, "-m", "train", "pretrain", "+cluster=h100x8", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: cluster=h100x8: trainer.devices=8 GPUs per node, but this machine has")


@pytest.mark.parametrize("preset", ["local", "cpu2", "h100x8", "h100x64"])
def test_presets_compose(preset):
    cfg = slurm.compose("pretrain", [f"+cluster={preset}"])
    assert cfg.cluster.name == preset
    assert int(cfg.trainer.devices) >= 1 and int(cfg.trainer.num_nodes) >= 1
    if preset.startswith("h100"):
        assert cfg.strategy.name == "zero" and cfg.strategy.stage == 3 and cfg.activation_checkpointing
        assert cfg.trainer.precision == "bf16-mixed" and cfg.cluster.gpu_memory_gb == 80
    if preset == "cpu2":
        assert cfg.strategy.name == "zero" and cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2


def test_slurm_script_from_a_preset(tmp_path):
    text = slurm.render("pretrain", ["+cluster=h100x64", "trainer.max_steps=10"], tmp_path, python="/x/python")
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12",
                 "#SBATCH --signal=USR1@180", "#SBATCH --requeue", f"#SBATCH --output={tmp_path}/slurm-%j.out"):
        assert line in text.splitlines()
    assert f"srun --kill-on-bad-exit=1 /x/python -m train pretrain +cluster=h100x64 trainer.max_steps=10 hydra.run.dir={tmp_path}" in text
    cpu = slurm.render("pretrain", ["+cluster=cpu2"], tmp_path)
    assert "#SBATCH --ntasks-per-node=2" in cpu and "--gpus-per-node" not in cpu
