"""`python -m train distill` end to end from a tiny pretrain export: the W&B run holds the DMD-2
metrics and the student/teacher samples, checkpoints resume exactly, the export samples in its 8
steps without guidance, and a teacher of another model config is refused naming the weights."""

import json
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from tests.test_pretrain_e2e import FPS, ROOT, SECONDS, metric, pretrain, run_overrides
from tests.test_pretrain_e2e import shards  # noqa: F401  (module fixture)
from train.checkpoint import read_weights


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("teacher")
    pretrain(run_dir, shards, 3, "logger.mode=disabled", "sample.every_n_steps=0")
    return run_dir / "export" / "model.safetensors"


def distill_args(run_dir: Path, shards: Path, teacher: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "train", "distill", f"teacher={teacher}", f"hydra.run.dir={run_dir}", *run_overrides(shards, max_steps),
        "data.loader.num_workers=0", "distill.critic_steps_per_generator_step=2", *extra,
    ]


def distill(*args, **kwargs):
    out = subprocess.run(distill_args(*args, **kwargs), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_distill_end_to_end_then_resume_exactly(shards, teacher, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    distill(straight, shards, teacher, 4)
    ckpts = {p.name for p in (straight / "checkpoints").glob("*.ckpt")}
    assert {"last.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"} <= ckpts

    runs = list((straight / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"distill/dm_loss", b"distill/dm_norm/video", b"distill/dm_norm/audio", b"distill/critic_loss",
                b"distill/gan_generator", b"distill/gan_critic", b"distill/gan_acc/real", b"distill/gan_acc/fake",
                b"distill/grad_norm/student", b"distill/grad_norm/critic", b"distill/skipped_generator",
                b"samples/student", b"samples/teacher"):
        assert key in blob, key
    # generator updates at steps 0 and 2 (one in critic_steps_per_generator_step=2)
    assert metric(straight, "distill/generator_step") == {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}

    # the student's sample (8 steps, no guidance) next to the teacher's (2 steps, cfg 5)
    student_mp4 = straight / "samples" / "step0000004_seed0.mp4"
    with av.open(str(student_mp4)) as c:
        assert c.streams.video[0].frames == round(SECONDS * FPS) and len(c.streams.audio) == 1
    info = json.loads(student_mp4.with_suffix(".json").read_text())
    assert (info["steps"], info["network_evaluations"], info["sampler"], info["cfg_video"]) == (8, 8, "student", 1.0)
    teacher_info = json.loads((straight / "samples" / "teacher_seed0.json").read_text())
    assert (teacher_info["network_evaluations"], teacher_info["sampler"]) == (4, "euler")

    # interrupted after step 2 (a generator step), resumed to 4: same losses as the straight run
    resumed = tmp_path / "resumed"
    distill(resumed, shards, teacher, 2)
    distill(resumed, shards, teacher, 4)
    for key in ("distill/critic_loss", "distill/dm_loss", "distill/gan_critic", "distill/exit_index"):
        a, b = metric(straight, key), metric(resumed, key)
        assert sorted(a) == sorted(b) and 3 in a, (key, a, b)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), (key, step, a, b)

    # `train sample` on the student's export: its own 8 steps, no guidance, by default
    out = tmp_path / "student.mp4"
    res = subprocess.run(
        [sys.executable, "-m", "train", "sample", f"ckpt={straight / 'export' / 'model.safetensors'}", "seed=3",
         f"seconds={SECONDS}", "height=16", "width=16", f"out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == round(SECONDS * FPS) and len(c.streams.audio) == 1
    info = json.loads(out.with_suffix(".json").read_text())
    assert (info["steps"], info["network_evaluations"], info["sampler"], info["float8"], info["video_window"]) == (8, 8, "student", "none", None)
    # the same with FP8 block matmuls (train/float8.py; on CPU the tensorwise recipe) and
    # windowed attention between video tokens (model/window.py)
    res = subprocess.run(
        [sys.executable, "-m", "train", "sample", f"ckpt={straight / 'export' / 'model.safetensors'}", "seed=3",
         f"seconds={SECONDS}", "height=16", "width=16", f"out={out}", "float8=tensorwise", "video_window=[1]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert (info["float8"], info["video_window"]) == ("tensorwise", "1xallxall")
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == round(SECONDS * FPS) and len(c.streams.audio) == 1
    res = subprocess.run(
        [sys.executable, "-m", "train", "sample", f"ckpt={straight / 'export' / 'model.safetensors'}", f"out={out}", "float8=rowwise"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 2 and "float8=rowwise: on CPU only float8=tensorwise" in res.stderr


def test_student_distilled_with_a_video_window_keeps_it_in_its_export(shards, teacher, tmp_path):  # noqa: F811
    """distill.student_video_window: the export records the window and `train sample` uses it
    unless told otherwise (video_window=none: dense)."""
    run_dir = tmp_path / "windowed"
    distill(run_dir, shards, teacher, 2, "distill.student_video_window=[1]", "logger.mode=disabled", "sample.every_n_steps=0")
    export = run_dir / "export" / "model.safetensors"
    assert read_weights(export)[1]["student"]["video_window"] == [1, None, None]
    out = tmp_path / "s.mp4"
    for override, want in (([], "1xallxall"), (["video_window=none"], None)):
        res = subprocess.run([sys.executable, "-m", "train", "sample", f"ckpt={export}", f"seconds={SECONDS}", "height=16", "width=16",
                              f"out={out}", *override], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(out.with_suffix(".json").read_text())["video_window"] == want


def test_distill_refuses_a_teacher_of_another_config(shards, teacher, tmp_path):  # noqa: F811
    res = subprocess.run(distill_args(tmp_path / "bad", shards, teacher, 1, "+model=tiny", "model.dim=32"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "weights do not fit the model config" in res.stderr and "shape mismatches" in res.stderr
    assert "embed.video.weight: (64, " in res.stderr  # names the key and both shapes
    res = subprocess.run(distill_args(tmp_path / "bad", shards, tmp_path / "none.safetensors", 1),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "teacher=" in res.stderr and "no such file" in res.stderr


TWO_RANKS = ("trainer.accelerator=cpu", "trainer.devices=2", "logger.mode=disabled", "activation_checkpointing=full")


@pytest.fixture(scope="module")
def ddp_straight(shards, teacher, tmp_path_factory):  # noqa: F811
    """An uninterrupted 4-step DDP run in 2 CPU ranks: the reference of the DDP resume and of the
    ZeRO runs (made once for all three tests)."""
    run_dir = tmp_path_factory.mktemp("ddp_straight")
    distill(run_dir, shards, teacher, 4, "strategy=ddp", *TWO_RANKS)
    return run_dir


def test_distill_two_processes_ddp_resumes_exactly(shards, teacher, ddp_straight, tmp_path):  # noqa: F811
    """2 CPU ranks (DDP, gloo): each rank reads its own shards, gradients are all-reduced in both
    networks' backward passes, and an interrupted run resumes to the same losses."""
    straight, resumed = ddp_straight, tmp_path / "resumed"
    distill(resumed, shards, teacher, 2, "strategy=ddp", *TWO_RANKS)
    distill(resumed, shards, teacher, 4, "strategy=ddp", *TWO_RANKS)
    for key in ("distill/critic_loss", "distill/dm_loss", "distill/gan_critic"):
        a, b = metric(straight, key), metric(resumed, key)
        assert sorted(a) == sorted(b) == [0, 1, 2, 3], (key, a, b)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), (key, step, a, b)
    wa = read_weights(straight / "export" / "model.safetensors")[0]
    wb = read_weights(resumed / "export" / "model.safetensors")[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_distill_zero_two_processes_one_engine_per_network(stage, shards, teacher, ddp_straight, tmp_path):  # noqa: F811
    """ZeRO with 2 CPU ranks (gloo): student and critic + head each get a DeepSpeed engine and
    optimizer, the teacher is partitioned (ZeRO-3) or whole; every engine is checkpointed (one
    DeepSpeed checkpoint per network), and an interrupted run resumes to the same losses and
    export. The losses match the DDP run's: the same math, only sharded."""
    pytest.importorskip("deepspeed")
    straight, resumed, ddp = tmp_path / "straight", tmp_path / "resumed", ddp_straight
    out = distill(straight, shards, teacher, 4, f"strategy={stage}", *TWO_RANKS)
    if stage == "zero3":  # built partitioned from the teacher file: rank 0 holds half the student
        m = re.search(r"networks built on \S+: student, critic, teacher; the student has ([\d,]+) parameters, ([\d,]+) of them held",
                      out.stdout + out.stderr)
        assert m, "no 'networks built' line"
        whole, held = (int(x.replace(",", "")) for x in m.groups())
        assert whole / 2 <= held < 0.6 * whole
    assert set(metric(straight, "distill/skipped_steps/critic").values()) == {0.0}  # DeepSpeed's overflow skips, logged
    assert set(metric(straight, "distill/skipped_steps/student").values()) == {0.0}
    last = straight / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {p.name for p in last.iterdir()} >= {"student", "critic"}
    if stage == "zero3":  # each rank holds its partition of each network
        for net in ("student", "critic"):
            assert {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= {p.name for p in (last / net).iterdir()}
    # Under ZeRO-3 the interrupted run keeps a whole teacher on each rank instead of a partitioned
    # one: the same numbers are expected either way.
    replicated = ("distill.teacher_partitioned=false",) if stage == "zero3" else ()
    distill(resumed, shards, teacher, 2, f"strategy={stage}", *TWO_RANKS, *replicated)
    distill(resumed, shards, teacher, 4, f"strategy={stage}", *TWO_RANKS, *replicated)
    for key in ("distill/critic_loss", "distill/dm_loss", "distill/gan_critic", "distill/grad_norm/student"):
        a, b, c = metric(straight, key), metric(resumed, key), metric(ddp, key)
        assert sorted(a) == sorted(b) == sorted(c), (key, a, b, c)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), (key, step, a, b)
            assert c[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), (key, step, a, c)
    wa = read_weights(straight / "export" / "model.safetensors")[0]
    wb = read_weights(resumed / "export" / "model.safetensors")[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_distill_compiled_under_zero3_trains_as_eager(shards, teacher, tmp_path):  # noqa: F811
    """The H100 presets compile under ZeRO-3: student and teacher blocks compiled (each a ZeRO-3
    leaf), the critic eager (it runs twice in one backward, which a leaf's once-per-call gradient
    reduction would count twice). Same losses as the eager run, generator steps included."""
    pytest.importorskip("deepspeed")
    one_rank = ("trainer.accelerator=cpu", "trainer.devices=1", "logger.mode=disabled", "activation_checkpointing=full", "strategy=zero3")
    runs = {compiled: tmp_path / f"compile_{compiled}" for compiled in (False, True)}
    for compiled, run_dir in runs.items():
        out = distill(run_dir, shards, teacher, 4, *one_rank, f"compile={str(compiled).lower()}")
    log = out.stdout + out.stderr
    assert "the critic runs eager under ZeRO-3" in log
    assert "compile: student: 4 blocks compiled as ZeRO-3 leaves" in log and "compile: teacher: 4 blocks compiled as ZeRO-3 leaves" in log
    for key in ("distill/critic_loss", "distill/dm_loss", "distill/gan_generator", "distill/grad_norm/student"):
        a, b = metric(runs[False], key), metric(runs[True], key)
        assert sorted(a) == sorted(b) and a, (key, a, b)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), (key, step, a, b)
    wa, wb = (read_weights(runs[c] / "export" / "model.safetensors")[0] for c in (False, True))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
