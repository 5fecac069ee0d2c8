"""Cluster presets, the checks made before any process group starts (GPUs, launcher variables,
memory per GPU), the memory arithmetic, and the SLURM script launch/slurm.py writes."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from model import ModelArgs
from train.cluster import ClusterConfig, check_launch, check_memory
from train.config import ConfigError
from train.memory import GIB, TrainingSetup, estimate_distill_per_gpu, estimate_per_gpu

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import slurm  # noqa: E402

HH15B = 14_970_000_000  # conf/model/hh15b.yaml, counted on the meta device (README)
H100 = ClusterConfig(name="h100x64", gpu_memory_gb=80)
TOKENS_5S_1080P = 63_000


def hh15b_args(**overrides) -> ModelArgs:
    """conf/model/hh15b.yaml's architecture, with overrides."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "hh15b.yaml"))
    cfg.pop("_target_")
    return ModelArgs(**{**cfg, **overrides})


def test_memory_arithmetic_by_hand():
    n = 1_000_000_000
    est = estimate_per_gpu(TrainingSetup(n, n_layers=10, dim=1000, tokens_per_micro_batch=1000, zero_stage=2, data_parallel=4,
                                         precision="bf16-mixed", ema=True, activation_checkpointing=True))
    assert est.weights == pytest.approx(2 * n / GIB)  # replicated under stage 2
    assert est.gradients == pytest.approx(2 * n / 4 / GIB)
    assert est.optimizer == pytest.approx(12 * n / 4 / GIB)
    assert est.ema == pytest.approx(4 * n / GIB)  # follows the weights
    assert est.activations == pytest.approx((10 * 2 * 1000 * 1000 + 34 * 1000 * 1000) / GIB)
    stage3 = estimate_per_gpu(TrainingSetup(n, 10, 1000, 1000, 3, 4))
    assert stage3.weights == pytest.approx(est.weights / 4) and stage3.ema == pytest.approx(est.ema / 4)
    fp32 = estimate_per_gpu(TrainingSetup(n, 10, 1000, 1000, 0, 1, precision="32-true", ema=False))
    assert (fp32.weights, fp32.gradients, fp32.optimizer, fp32.ema) == pytest.approx((4 * n / GIB, 4 * n / GIB, 8 * n / GIB, 0))


def test_15b_on_64_h100_needs_zero3():
    """The presets' choice (docs/training.md): ZeRO-2 keeps 30 GB of bf16 weights and a 60 GB fp32
    EMA on every GPU, ZeRO-3 spreads them; with activation checkpointing a 5 s 1080p clip fits."""
    trainer = {"devices": 8, "num_nodes": 8}
    args = hh15b_args()

    def check(cluster, stage, checkpointing=True):
        est = estimate_per_gpu(TrainingSetup(HH15B, args.n_layers, args.dim, TOKENS_5S_1080P, stage, 64, activation_checkpointing=checkpointing))
        check_memory(cluster, est, "14.97B parameters", stage, TOKENS_5S_1080P, trainer)

    with pytest.raises(ConfigError, match=r"cluster=h100x64: 14.97B parameters with ZeRO-2 over 64 GPUs .* more than its 80 GB"):
        check(H100, 2)
    check(H100, 3)  # fits
    with pytest.raises(ConfigError, match="ZeRO-3"):  # ...but not without activation checkpointing
        check(H100, 3, checkpointing=False)
    check(ClusterConfig(name="local"), 2)  # gpu_memory_gb 0: not checked


def test_distill_memory_arithmetic_by_hand():
    """Two trained networks (the student with its EMA, the critic) and the frozen teacher: 2 bytes
    a parameter partitioned, 2 whole in DeepSpeed's bf16, 4 as Lightning's fp32 parameters."""
    n, layers, dim, tokens = 1_000_000_000, 10, 1000, 1000
    setup = TrainingSetup(n, layers, dim, tokens, zero_stage=3, data_parallel=4)
    one = estimate_per_gpu(setup)
    est = estimate_distill_per_gpu(setup)
    assert (est.weights, est.gradients, est.optimizer) == pytest.approx((2 * one.weights, 2 * one.gradients, 2 * one.optimizer))
    assert est.ema == pytest.approx(one.ema)  # the student's only
    assert est.frozen == pytest.approx(2 * n / 4 / GIB)
    # both trained networks keep their block inputs, plus the layer working now
    assert est.activations == pytest.approx((2 * layers * 2 * tokens * dim + 34 * tokens * dim) / GIB)
    assert estimate_distill_per_gpu(setup, teacher_partitioned=False).frozen == pytest.approx(2 * n / GIB)
    assert estimate_distill_per_gpu(replace(setup, zero_stage=2)).frozen == pytest.approx(2 * n / GIB)
    assert estimate_distill_per_gpu(replace(setup, zero_stage=0, data_parallel=1)).frozen == pytest.approx(4 * n / GIB)
    offload = estimate_distill_per_gpu(replace(setup, offload_optimizer=True, offload_parameters=True))
    assert (offload.optimizer, offload.weights, offload.frozen) == (0, 0, 0) and offload.ema == est.ema  # the EMA stays
    whole = estimate_distill_per_gpu(replace(setup, activation_checkpointing=False))
    assert whole.activations == pytest.approx((2 * layers * 34 * tokens * dim + 34 * tokens * dim) / GIB)
    assert "frozen 0.5" in est.table() and "frozen" not in one.table()


def test_distill_preset_memory_is_checked_before_start(tmp_path):
    """`distill +cluster=h100x8 strategy=zero2` on the 15B model: two trained networks and the
    teacher replicated cannot fit, and the message says so before any process starts
    (accelerator=cpu: the GPU count check of the preset does not stop it first)."""
    from train.checkpoint import describe, export_safetensors
    from train.codec import PatchCodec

    # A teacher file with the hh15b description and no tensors: the check reads only the description.
    codec = PatchCodec()
    fps, rate = 12.0, 8000  # the synthetic data's (conf/data/synthetic.yaml)
    args = hh15b_args(text_input="bytes", video_channels=codec.video_latent_channels, audio_channels=codec.audio_latent_channels,
                      audio_latents_per_video_frame=codec.audio_latents_per_video_frame(fps, rate))
    teacher = export_safetensors(tmp_path / "teacher.safetensors", {}, describe(args, codec, fps, rate, 1, 64, (256, 1.0, 3.0)), 0, "raw")
    out = subprocess.run(
        [sys.executable, "-m", "train", "distill", "+cluster=h100x8", "strategy=zero2", f"teacher={teacher}", "trainer.accelerator=cpu",
         "trainer.precision=bf16-mixed", "data.loader.batch_size=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cluster=h100x8: student + critic + teacher of ") and "with ZeRO-2 over 8 GPUs" in last, last
    assert "frozen" in last


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
    assert f"srun --kill-on-bad-exit=1 --cpus-per-task=12 /x/python -m train pretrain +cluster=h100x64 trainer.max_steps=10 hydra.run.dir={tmp_path}" in text
    cpu = slurm.render("pretrain", ["+cluster=cpu2"], tmp_path)
    assert "#SBATCH --ntasks-per-node=2" in cpu and "--gpus-per-node" not in cpu


def test_selective_checkpointing_with_compiled_zero3_blocks_is_refused(tmp_path):
    """Under ZeRO-3 the blocks compile inside their checkpoint, where a selective policy would
    see none of their ops (it would recompute everything): refused in one line, before training."""
    out = subprocess.run([sys.executable, "-m", "train", "pretrain", "strategy=zero3", "compile=true", "activation_checkpointing=selective",
                          "trainer.accelerator=cpu", "logger.mode=disabled", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: activation_checkpointing=selective with compile=true under ZeRO-3")


def test_zero_refuses_parameter_sizes_that_unalign_its_flat_buffer(monkeypatch):
    """model.n_heads=12 at dim 1536 gives 12-element gate biases, which leave the parameters after
    them off 16-byte alignment in DeepSpeed's flat buffer: ZeRO-3 on one H200 stopped with
    'misaligned address' (n_heads=16 ran). Refused before any process group; the settings where
    every parameter is aligned, or gathered into its own tensor, pass."""
    import torch

    from model import build_model
    from train.cluster import check_zero_parameter_alignment

    mid = {"dim": 1536, "n_kv_heads": 4, "mlp_hidden": 4096, "n_modality_in": 1, "n_shared": 2, "n_modality_out": 1}
    with torch.device("meta"):
        twelve = build_model(**vars(hh15b_args(**mid, n_heads=12)))
        sixteen = build_model(**vars(hh15b_args(**mid, n_heads=16)))
        hh15b = build_model(**vars(hh15b_args(n_shared=1, n_modality_in=1, n_modality_out=1)))
    one_gpu = {"accelerator": "gpu", "devices": 1, "num_nodes": 1, "precision": "bf16-mixed"}
    eight_gpus = {**one_gpu, "devices": 8}
    with pytest.raises(ConfigError, match=r"ZeRO-3 on one GPU: .*gate\.proj\.bias \(12\).*model\.n_heads a multiple of 8"):
        check_zero_parameter_alignment(twelve, 3, one_gpu)
    with pytest.raises(ConfigError, match=r"ZeRO-2: .*\(12\).*or strategy=zero3 on more than one GPU"):
        check_zero_parameter_alignment(twelve, 2, eight_gpus)
    check_zero_parameter_alignment(sixteen, 3, one_gpu)
    check_zero_parameter_alignment(sixteen, 2, eight_gpus)
    check_zero_parameter_alignment(hh15b, 3, one_gpu)  # the production width: every size a multiple of 8
    check_zero_parameter_alignment(twelve, 3, eight_gpus)  # gathered parameters are fresh tensors
    check_zero_parameter_alignment(twelve, 3, {**one_gpu, "devices": [0, 1]})
    check_zero_parameter_alignment(twelve, 0, one_gpu)  # DDP: every parameter its own tensor
    check_zero_parameter_alignment(twelve, 2, {**eight_gpus, "precision": "32-true"})  # 12 fp32 elements: 48 bytes
    check_zero_parameter_alignment(twelve, 3, {**one_gpu, "accelerator": "cpu"})
    # accelerator and devices "auto": this machine's GPUs decide
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    auto = {**one_gpu, "accelerator": "auto", "devices": "auto"}
    check_zero_parameter_alignment(twelve, 3, auto)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="ZeRO-3 on one GPU"):
        check_zero_parameter_alignment(twelve, 3, auto)


def test_world_size_reads_devices_as_lightning_does(monkeypatch):
    """The memory check and the strategy (DeepSpeed's global batch, DDP's unused-parameter mode)
    divide by the processes the Trainer starts: devices="auto"/-1 is every GPU of the node on a
    GPU run (it once counted as 1: the estimate for one GPU, on eight), one process on the CPU."""
    import torch

    from train.cluster import world_size

    gpu = {"accelerator": "gpu", "num_nodes": 2}
    assert [world_size({**gpu, "devices": d}) for d in (8, "8", [0, 1, 2], "0,1", "0,")] == [16, 16, 6, 4, 2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert [world_size({**gpu, "devices": d}) for d in ("auto", -1, "-1")] == [16, 16, 16]
    assert world_size({"devices": "auto"}) == 8  # accelerator auto with a GPU present: the GPUs
    assert world_size({"accelerator": "cpu", "devices": "auto"}) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"trainer.devices=8 GPUs per node, but this machine has 2"):
        check_launch(ClusterConfig(name="h100x8"), {"accelerator": "gpu", "devices": "8", "num_nodes": 1}, environ={})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert world_size({"devices": "auto", "num_nodes": 1}) == 1
