"""Preemption and faults: SIGUSR1/SIGTERM mid-run write checkpoints/last.ckpt and end the run
cleanly (no export: training is not over), `kill -9` loses only the steps since the last
checkpoint, and the restarted run resumes at the right step with the losses of an uninterrupted
run, in the same W&B run."""

import csv
import shutil
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


def _tree(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): f.read_text() for f in sorted(path.rglob("*")) if f.is_file()}


def _write(files: dict[str, str], fail_after: int | None = None):
    """A checkpoint writer: the files, in order; with fail_after, killed after that many."""
    def write(path: Path):
        path.mkdir(parents=True)
        for i, (name, text) in enumerate(files.items()):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt("killed mid-save")
            (path / name).write_text(text)
    return write


def test_directory_checkpoints_are_replaced_whole_or_not_at_all(tmp_path):
    """DeepSpeed checkpoints (directories every rank writes into; last.ckpt is re-saved in place)
    go through replace_directory_atomically: a save killed midway leaves the previous checkpoint
    as it was and resume=auto ignores the leftovers; the next save clears them."""
    from train.stages import resolve_resume
    from train.checkpoint import replace_directory_atomically

    ckpts = tmp_path / "checkpoints"
    last, periodic = ckpts / "last.ckpt", ckpts / "step=2.ckpt"
    one_rank = dict(barrier=lambda: None, is_rank_zero=True)
    replace_directory_atomically(periodic, _write({"model.pt": "step 2"}), **one_rank)
    time.sleep(0.01)
    replace_directory_atomically(last, _write({"model.pt": "step 2", "optim.pt": "step 2"}), **one_rank)
    assert _tree(last) == {"model.pt": "step 2", "optim.pt": "step 2"}
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=2.ckpt"]

    with pytest.raises(KeyboardInterrupt):  # killed after writing one of two files
        replace_directory_atomically(last, _write({"model.pt": "step 4", "optim.pt": "step 4"}, fail_after=1), **one_rank)
    assert _tree(last) == {"model.pt": "step 2", "optim.pt": "step 2"}  # untouched, not half new
    assert (ckpts / "last.ckpt.partial").is_dir()
    assert resolve_resume("auto", tmp_path) == str(last)  # the leftover is not a checkpoint

    replace_directory_atomically(last, _write({"model.pt": "step 6", "optim.pt": "step 6"}), **one_rank)
    assert _tree(last) == {"model.pt": "step 6", "optim.pt": "step 6"}
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=2.ckpt"]  # leftovers cleared

    # killed between the two renames: no last.ckpt, and resume=auto takes the newest whole one
    last.rename(ckpts / "last.ckpt.old")
    assert resolve_resume("auto", tmp_path) == str(periodic)
    # a single-file checkpoint of another strategy at the same name is replaced too
    for leftover in ckpts.glob("last.ckpt*"):
        shutil.rmtree(leftover)
    last.write_text("a Lightning file checkpoint")
    replace_directory_atomically(last, _write({"model.pt": "step 8"}), **one_rank)
    assert _tree(last) == {"model.pt": "step 8"}


def test_an_export_killed_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    from safetensors import safe_open

    import train.checkpoint as checkpoint

    path = tmp_path / "export" / "model.safetensors"
    checkpoint.export_safetensors(path, {"w": torch.ones(3)}, {}, 10, "ema")

    def torn(tensors, filename, metadata):  # half a file, then the kill
        Path(filename).write_bytes(b"\x00" * 7)
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr(checkpoint, "save_file", torn)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.export_safetensors(path, {"w": torch.zeros(3)}, {}, 20, "ema")
    with safe_open(str(path), "pt") as f:  # the step-10 export, whole
        assert f.metadata()["step"] == "10" and torch.equal(f.get_tensor("w"), torch.ones(3))


def test_pruning_keeps_the_newest_periodic_checkpoints_by_step(tmp_path):
    from train.checkpoint import prune_checkpoints

    for name in ("epoch=0-step=2.ckpt", "epoch=0-step=10.ckpt", "last.ckpt.partial"):  # ZeRO: directories
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pt").write_text(name)
    for name in ("epoch=0-step=4.ckpt", "last.ckpt", "epoch=0-step=1.ckpt.deleting", "notes.txt"):
        (tmp_path / name).write_text(name)
    assert prune_checkpoints(tmp_path, 0) == []  # 0 keeps all
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["epoch=0-step=2.ckpt"]  # by step: 10 is newer than 2 and 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch=0-step=10.ckpt", "epoch=0-step=4.ckpt", "last.ckpt", "last.ckpt.partial", "notes.txt"]  # the .deleting leftover gone


class _OneWeight:
    """A one-parameter LightningModule: what is tested are the callbacks around it."""

    @staticmethod
    def build():
        import lightning as L
        from torch.utils.data import DataLoader

        class OneWeight(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def training_step(self, batch, batch_idx):
                return (self.w - 1).pow(2).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

            def train_dataloader(self):
                return DataLoader(torch.zeros(100, 1), batch_size=1)

        return OneWeight()


def _fit_with_signal_at(tmp_path, signal_step, max_steps=6, resume=None):
    """Fit for max_steps with a SIGUSR1 noted during step `signal_step` (as the handler would);
    returns the preemption callback and the paths the trainer saved, in order."""
    import lightning as L

    from train.callbacks import PeriodicCheckpoint
    from train.preemption import PreemptionCallback

    preemption = PreemptionCallback(tmp_path / "checkpoints" / "last.ckpt", marker=tmp_path / "preempted")

    class SignalAt(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step + 1 == signal_step:
                preemption.received = signal.SIGUSR1

    saved = []

    class Recording(L.Trainer):
        def save_checkpoint(self, filepath, *args, **kwargs):
            saved.append(Path(filepath).name)
            super().save_checkpoint(filepath, *args, **kwargs)

    trainer = Recording(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[PeriodicCheckpoint(tmp_path / "checkpoints", 2, 0), preemption, SignalAt()])
    trainer.fit(_OneWeight.build(), ckpt_path=resume)
    return preemption, saved, trainer


def test_preemption_saves_once_and_a_signal_at_the_last_step_finishes_the_run(tmp_path, capsys):
    run = tmp_path / "mid"
    last = str(run / "checkpoints" / "last.ckpt")
    # At a periodic step (4 of 6): last.ckpt once, by the preemption, and no periodic save after it.
    preemption, saved, trainer = _fit_with_signal_at(run, signal_step=4)
    assert preemption.preempted and trainer.global_step == 4
    assert saved == ["epoch=0-step=2.ckpt", "last.ckpt", "last.ckpt"]  # step 2's periodic pair, then the preemption's
    assert (run / "preempted").read_text() == "SIGUSR1 at step 4\n"

    # Resumed, and preempted again before its first periodic save: still one save, no last-v1.ckpt.
    preemption, saved, trainer = _fit_with_signal_at(run, signal_step=5, resume=last)
    assert preemption.preempted and saved == ["last.ckpt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]

    # The marker goes at the next start, even one that finds nothing left to train (the fit
    # loop is skipped: no on_train_start), so a requeued job is not requeued again.
    _fit_with_signal_at(run, signal_step=-1, max_steps=5, resume=last)
    assert not (run / "preempted").exists()

    # During the last step: not a preemption. last.ckpt is saved first (the run may be killed
    # during its samples and export), once, and the run finishes as it would have.
    preemption, saved, trainer = _fit_with_signal_at(tmp_path / "last", signal_step=6)
    assert not preemption.preempted and trainer.global_step == 6
    assert not (tmp_path / "last" / "preempted").exists()
    assert saved == ["epoch=0-step=2.ckpt", "last.ckpt", "epoch=0-step=4.ckpt", "last.ckpt", "last.ckpt"]
    assert "SIGUSR1: saving" in capsys.readouterr().out
    assert torch.load(tmp_path / "last" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6

    # Preempted before the first periodic save, then resumed: later saves replace last.ckpt
    # (no last-v1.ckpt beside a stale one).
    early = tmp_path / "early"
    _fit_with_signal_at(early, signal_step=1)
    _fit_with_signal_at(early, signal_step=-1, resume=str(early / "checkpoints" / "last.ckpt"))
    assert sorted(p.name for p in (early / "checkpoints").iterdir()) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]


def test_only_rank_zero_makes_the_wandb_run_id(tmp_path, monkeypatch):
    """Under srun/torchrun every rank builds its logger at once: a rank that is not 0 never writes
    the id file (its own id could replace rank 0's), and reads the id once it is there."""
    from lightning.pytorch.utilities import rank_zero_only

    from train.wandb_run import wandb_run_id

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert wandb_run_id(tmp_path) is None and not any(tmp_path.iterdir())
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    made = wandb_run_id(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wandb_run_id"]  # written whole, nothing left over
    assert wandb_run_id(tmp_path) == made
    monkeypatch.setattr(rank_zero_only, "rank", 3)
    assert wandb_run_id(tmp_path) == made


def test_single_file_checkpoints_are_written_next_to_their_target(tmp_path, monkeypatch):
    """A save killed midway leaves the previous checkpoint as it was, whatever filesystem $TMPDIR
    is on (nothing is staged there); the next save clears the leftover."""
    from train.checkpoint import SameDirectoryCheckpointIO

    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    monkeypatch.setattr("tempfile.tempdir", None)
    io, last = SameDirectoryCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 2}, last)
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 4}, last)
    assert torch.load(last, weights_only=False) == {"step": 2} and not any(staging.iterdir())
    from train.stages import resolve_resume
    assert resolve_resume("auto", tmp_path) == str(last)  # the leftover is not a checkpoint
    monkeypatch.setattr(torch, "save", real_save)
    io.save_checkpoint({"step": 6}, last)
    assert torch.load(last, weights_only=False) == {"step": 6}
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
