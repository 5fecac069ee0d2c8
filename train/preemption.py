"""Preemption: the scheduler's warning signal saves a checkpoint and ends the run cleanly.

SLURM sends SIGUSR1 (`#SBATCH --signal=USR1@<seconds>`, launch/) some time before the job's end
or a preemption; other schedulers and `kill` send SIGTERM. Either way, at the end of the current
step every rank agrees to stop (one all-reduce of a flag per step), `checkpoints/last.ckpt` is
written (the data stream position, RNG and EMA with it), `<run_dir>/preempted` records the step,
and the run ends cleanly (exit code 0) without the end-of-training samples and export. The batch
script of launch/slurm.py then requeues the job (`scontrol requeue`, after srun has returned, so
nothing is killed mid-write); its next start resumes from last.ckpt (resume=auto) in the same run
directory, with the same W&B run.

The handlers replace whatever was installed before training started: Lightning's SIGTERM
handler (which kills the ranks it launched before anyone could save) and W&B's (which ends the
process), and Lightning's SLURM auto-requeue is turned off where this callback is used (it saves
an `hpc_ckpt_N.ckpt` outside checkpoints/), so there is one resume path. They are re-installed
before every step if a library replaced them meanwhile (W&B starts its run lazily).
"""

import signal
from pathlib import Path

import lightning as L


class PreemptionCallback(L.Callback):
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, checkpoint_path: Path, marker: Path):
        self.checkpoint_path = Path(checkpoint_path)
        self.marker = Path(marker)
        self.received: int | None = None
        self.preempted = False
        self._previous = {}

    def _handler(self, signum, frame):
        self.received = signum  # only note it: the step finishes, then on_train_batch_end acts

    def _install(self):
        for signum in self.SIGNALS:
            current = signal.getsignal(signum)
            if current != self._handler:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._handler)

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero:
            self.marker.unlink(missing_ok=True)  # this start is the resume it asked for
        self._install()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._install()

    def teardown(self, trainer, module, stage):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        stop = self.received is not None or bool(getattr(trainer, "received_sigterm", False))
        # Any rank's signal stops all ranks. The all-reduce makes a device tensor from the flag
        # and reads it back: two syncs a step, even in one process under DeepSpeed, so only with
        # several ranks (where Lightning's own SIGTERM broadcast syncs every step anyway).
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signame = signal.Signals(self.received).name if self.received else "SIGTERM"
        print(f"{signame}: saving {self.checkpoint_path} at step {trainer.global_step} and stopping", flush=True)
        trainer.save_checkpoint(self.checkpoint_path)
        if trainer.is_global_zero:
            self.marker.write_text(f"{signame} at step {trainer.global_step}\n")
        self.preempted = True
        trainer.should_stop = True
        # The checkpoint is written: Lightning need not raise its SIGTERMException after the step.
        trainer._signal_connector.received_sigterm = False


def was_preempted(trainer) -> bool:
    """True when the run is ending because of a preemption signal (skip end-of-run work)."""
    return any(isinstance(c, PreemptionCallback) and c.preempted for c in trainer.callbacks)
