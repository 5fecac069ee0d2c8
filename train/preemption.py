"""Preemption: the scheduler's warning signal saves a checkpoint and ends the run cleanly.

SLURM sends SIGUSR1 (`#SBATCH --signal=USR1@<seconds>`, launch/) some time before the job's end
or a preemption; other schedulers and `kill` send SIGTERM. Either way, at the end of the current
step every rank agrees to stop (one all-reduce of a flag per step), `checkpoints/last.ckpt` is
written (the data stream position, RNG and EMA with it), `<run_dir>/preempted` records the step,
and the run ends cleanly (exit code 0) without the end-of-training samples and export. A signal
during the last step is not a preemption: last.ckpt is saved, then the run finishes as it would
have (samples, export).
The batch script of launch/slurm.py then requeues the job (`scontrol requeue`, after srun has
returned, so nothing is killed mid-write); its next start resumes from last.ckpt (resume=auto)
in the same run directory, with the same W&B run.

The handlers are installed when fit sets up (so a warning during the checkpoint load or the
compile is kept for the first step's end). They replace whatever was installed before:
Lightning's SIGTERM handler (which kills the ranks it launched before anyone could save) and
W&B's (which ends the process); Lightning's SLURM auto-requeue is turned off where this callback
is used (it saves an `hpc_ckpt_N.ckpt` outside checkpoints/), so there is one resume path. They
are re-installed before every step if a library replaced them meanwhile (W&B starts its run
lazily).
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
        self.saved_step: int | None = None  # the global step of this callback's last save
        self._previous = {}

    def _handler(self, signum, frame):
        self.received = signum  # only note it: the step finishes, then on_train_batch_end acts

    def _install(self):
        for signum in self.SIGNALS:
            current = signal.getsignal(signum)
            if current != self._handler:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._handler)

    def setup(self, trainer, module, stage):
        # From the start of fit: a warning that arrives while the checkpoint loads or the blocks
        # compile is noted (SIGUSR1's default action would end the process), and acted on at the
        # end of the first step.
        self._install()

    def on_fit_start(self, trainer, module):
        # This start is the resume the marker asked for. on_fit_start, not on_train_start: a run
        # resumed with nothing left to train never starts its training loop, and a marker left
        # behind would requeue the job forever.
        if trainer.is_global_zero:
            self.marker.unlink(missing_ok=True)

    def on_train_start(self, trainer, module):
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
        trainer._signal_connector.received_sigterm = False  # handled here: no SIGTERMException after the step
        last_step = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        print(f"{signame}: saving {self.checkpoint_path} at step {trainer.global_step}"
              f"{', then finishing the run (its last step)' if last_step else ' and stopping'}", flush=True)
        trainer.save_checkpoint(self.checkpoint_path)
        self.saved_step = trainer.global_step  # PeriodicCheckpoint (it runs after this) saves nothing more at this step
        if last_step:
            # The run ends now anyway, with its samples and export. As a preemption it would skip
            # them, and its requeued job would find nothing to train; killed during them, it
            # leaves the final state in last.ckpt.
            self.received = None
            return
        if trainer.is_global_zero:
            self.marker.write_text(f"{signame} at step {trainer.global_step}\n")
        self.preempted = True
        trainer.should_stop = True


def was_preempted(trainer) -> bool:
    """True when the run is ending because of a preemption signal (skip end-of-run work)."""
    return any(isinstance(c, PreemptionCallback) and c.preempted for c in trainer.callbacks)


def saved_on_signal(trainer) -> bool:
    """True when a signal's checkpoint holds the current step already."""
    return any(isinstance(c, PreemptionCallback) and c.saved_step == trainer.global_step for c in trainer.callbacks)
