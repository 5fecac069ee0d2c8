"""Logging from inside the training step without host syncs.

Two things in Lightning's `self.log` stall the step on a GPU, each a wait for every kernel queued
so far, after which the host prepares the next step while the GPU idles:
- a Python number is made a tensor on the module's device, `torch.tensor(value, device=...)`: a
  blocking host-to-device copy, which synchronises the stream;
- a metric logged with `prog_bar=True` is read back (`.item()`) after every batch, whether or not
  a progress bar shows it (`metrics["pbar"]` of Lightning's logger connector).
A number the host already holds (the learning rate, the shift, a counter) is logged as a CPU
tensor instead: Lightning keeps it on the CPU, and the loggers read it there. GPU tensors (the
losses, the gradient norm) are read only on logging steps, by the loggers.
"""

import torch


def host_scalar(value: float) -> torch.Tensor:
    """`value` as a float32 CPU tensor, for `self.log`: no copy to the GPU, so no sync."""
    return torch.tensor(float(value), dtype=torch.float32)


def progress_bar_on(module) -> bool:
    """`prog_bar=` for a GPU tensor: only when a progress bar shows it, since Lightning reads
    every progress-bar metric back after each batch (the H100 presets turn the bar off)."""
    trainer = module._trainer  # None outside a Trainer, where self.log does nothing
    return trainer is not None and trainer.progress_bar_callback is not None


def loggable(value) -> torch.Tensor:
    """A tensor as it is (detached), a number as a CPU tensor (DeepSpeed's gradient norm is
    either, by stage and version)."""
    return value.detach() if torch.is_tensor(value) else host_scalar(value)
