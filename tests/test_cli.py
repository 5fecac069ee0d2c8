"""`python -m train`: stages, help, and one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from train.cli import CONF_DIR
from train.stages import fill_model_from_codec, to_object
from train.config import ConfigError, OptimConfig

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_lists_stages():
    out = run("--help")
    assert out.returncode == 0
    for stage in ("pretrain", "distill", "sample"):
        assert stage in out.stdout


def test_stage_help_is_hydras():
    out = run("pretrain", "--help")
    assert out.returncode == 0
    assert "Configuration groups" in out.stdout or "== Config ==" in out.stdout
    assert "optimizer" in out.stdout and "codec" in out.stdout


def test_unknown_stage_is_one_line():
    out = run("pretrian")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "unknown stage 'pretrian'" in out.stderr and "pretrain" in out.stderr


def test_missing_checkpoint_is_one_line(tmp_path):
    out = run("sample", f"ckpt={tmp_path / 'nope.safetensors'}", f"out={tmp_path / 'x.mp4'}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "nope.safetensors" in out.stderr and "no such file" in out.stderr


def test_bad_video_window_is_refused_before_loading(tmp_path):
    out = run("sample", f"ckpt={tmp_path / 'nope.safetensors'}", "video_window=[-1]")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "video_window=[-1]: VideoWindow.t=-1: a half-width is an integer >= 0" in out.stderr
    assert "no such file" not in out.stderr  # refused before the checkpoint is read


def test_wrong_type_and_range_name_the_option(tmp_path):
    out = run("pretrain", f"hydra.run.dir={tmp_path}", "optimizer.warmup_steps=abc", "data.synthetic=null", f"data.loader.shards={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "warmup_steps" in out.stderr
    out = run("pretrain", f"hydra.run.dir={tmp_path}", "optimizer.lr=-1", "data.synthetic=null", f"data.loader.shards={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "optimizer.lr=-1" in out.stderr and "must be > 0" in out.stderr


def test_float8_the_device_cannot_run_is_refused_before_start(tmp_path):
    out = run("pretrain", f"hydra.run.dir={tmp_path}", "float8=rowwise", "trainer.accelerator=cpu")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "float8=rowwise: on CPU only float8=tensorwise" in out.stderr
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "checkpoints").exists()  # no logger, no trainer yet


def test_fp16_precision_is_refused_before_start(tmp_path):
    out = run("pretrain", f"hydra.run.dir={tmp_path}", "trainer.precision=16-mixed", "trainer.accelerator=cpu")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "trainer.precision=16-mixed: fp16 is not supported; use bf16-mixed" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def compose_cfg(stage, overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=stage, overrides=list(overrides))


def test_overrides_reach_the_objects_they_name():
    cfg = compose_cfg("pretrain", ["optimizer.lr=0.123", "codec.audio_hop=80", "model.dim=96", "data.loader.fps=8", "trainer.max_steps=7"])
    assert to_object(OptimConfig, cfg.optimizer, "optimizer").lr == 0.123
    codec = instantiate(cfg.codec)
    assert codec.hop == 80
    loader = instantiate(cfg.data.loader)
    assert loader.fps == 8
    model_cfg = fill_model_from_codec(cfg.model, codec, loader.fps, loader.sample_rate)
    with torch.device("meta"):
        model = instantiate(model_cfg)
    assert model.args.dim == 96 and model.args.audio_channels == 80
    assert model.args.audio_latents_per_video_frame == pytest.approx(loader.sample_rate / 80 / 8)
    assert cfg.trainer.max_steps == 7


def test_model_preset_that_disagrees_with_the_codec_is_refused():
    cfg = compose_cfg("pretrain", ["model.audio_channels=7"])
    codec = instantiate(cfg.codec)
    with pytest.raises(ConfigError, match=r"model.audio_channels=7 but the codec"):
        fill_model_from_codec(cfg.model, codec, 12, 8000)


def test_windowed_student_with_selective_checkpointing_needs_compile_on_a_gpu(tmp_path):
    out = run("distill", f"hydra.run.dir={tmp_path}", f"teacher={tmp_path / 'nope.safetensors'}", "distill.student_video_window=[2]",
              "activation_checkpointing=selective", "compile=false", "trainer.accelerator=gpu")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "distill.student_video_window with activation_checkpointing=selective on a GPU needs compile=true" in out.stderr


def test_steps_and_accumulation_the_stages_cannot_take_are_refused():
    from train.stages import check_steps

    check_steps({"max_steps": 10}, "pretrain")
    with pytest.raises(ConfigError, match=r"trainer.max_steps=-1: the pretrain stage needs a number of steps >= 1"):
        check_steps({"max_steps": -1}, "pretrain")
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches: the pretrain stage takes 1 \(every micro-batch.*same noise"):
        check_steps({"max_steps": 10, "accumulate_grad_batches": 2}, "pretrain")
    with pytest.raises(ConfigError, match=r"the distill stage takes 1 \(it steps its optimizers itself\)"):
        check_steps({"max_steps": 10, "accumulate_grad_batches": 4}, "distill")
