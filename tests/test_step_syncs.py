"""The training steps log without host syncs (train/metrics.py): no Python number reaches
Lightning's `self.log` (it would copy it to the GPU, blocking), and nothing is shown in the
progress bar when there is none (Lightning reads progress-bar metrics back after every batch).
On a GPU, the whole loop iteration of a pretraining step runs under CUDA's sync check."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests import test_distill_module, test_pretrain_module
from tests.test_pretrain_module import Repeat, fixed_batch


def logged_calls(monkeypatch) -> list:
    calls = []
    log = L.LightningModule.log

    def spy(self, name, value, *args, **kwargs):
        calls.append((name, value, kwargs.get("prog_bar", False)))
        return log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", spy)
    return calls


def fit(module, steps, accelerator="cpu", callbacks=(), **trainer_kwargs):
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, callbacks=list(callbacks), **{**kwargs, **trainer_kwargs})
    trainer.fit(module, DataLoader(Repeat(fixed_batch(), steps), batch_size=None))
    return trainer


@pytest.mark.parametrize("stage", ["pretrain", "distill"])
def test_every_logged_value_is_a_tensor_and_none_goes_to_a_missing_progress_bar(monkeypatch, stage):
    calls = logged_calls(monkeypatch)
    module = test_pretrain_module.make_module() if stage == "pretrain" else test_distill_module.make_module(ema_decay=0.9)
    fit(module, 4, gradient_clip_val=1.0 if stage == "pretrain" else None)
    names = {name for name, _, _ in calls}
    expected = {"train/loss", "train/shift", "train/lr", "train/grad_norm"} if stage == "pretrain" else {
        "distill/exit_index", "distill/generator_step", "distill/lr_student", "distill/critic_loss", "distill/dm_loss"}
    assert expected <= names, expected - names
    numbers = sorted({name for name, value, _ in calls if not torch.is_tensor(value)})
    assert not numbers, f"logged as Python numbers (a blocking copy to the GPU each): {numbers}"
    assert not [name for name, _, prog_bar in calls if prog_bar]


def test_the_loss_is_in_the_progress_bar_when_there_is_one(monkeypatch):
    calls = logged_calls(monkeypatch)
    fit(test_pretrain_module.make_module(), 2, enable_progress_bar=True)
    assert {name for name, _, prog_bar in calls if prog_bar} == {"train/loss"}


class SyncCheck(L.Callback):
    """CUDA's sync check ("error": a synchronising call raises) from the start of batch `start`
    to the start of batch `stop`: whole loop iterations, Lightning's bookkeeping and the next
    batch's copy to the device included."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.start:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        elif batch_idx == self.stop:
            torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer, module, exception):  # before Lightning's teardown, which may sync
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretraining_steps_do_not_synchronise_the_gpu(tmp_path, monkeypatch):
    """Steps 2-4 of the module with the stage's per-step callbacks (throughput, preemption) and
    an EMA fold (every 3 steps: at step 3) inside the checked iterations."""
    from train import pretrain
    from train.preemption import PreemptionCallback
    from train.throughput import ThroughputCallback

    # The first log of a name makes Lightning move that metric's state to the GPU, a blocking
    # copy: once per name and run. A timestep bucket's loss is first logged when a step first
    # draws a t in it, which with 4 buckets falls inside the checked steps; with one bucket,
    # every name is logged from the first step, and the check sees the steady state.
    monkeypatch.setattr(pretrain, "T_BUCKETS", (0.0, 1.0))
    module = test_pretrain_module.make_module(ema_every=3)
    callbacks = [ThroughputCallback(), PreemptionCallback(tmp_path / "last.ckpt", marker=tmp_path / "preempted"), SyncCheck(2, 5)]
    try:  # log_every_n_steps past the checked steps: the loggers read the metrics back on logging steps
        trainer = fit(module, 6, accelerator="gpu", callbacks=callbacks, gradient_clip_val=1.0, precision="bf16-mixed",
                      log_every_n_steps=100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 6 and module.ema.folded == 6
