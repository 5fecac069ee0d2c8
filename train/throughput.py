"""Tokens/s and MFU of real training, logged to W&B beside the losses.

Lightning's `ThroughputMonitor` synchronises the GPU after every batch and takes one FLOP count
for the whole run. Our steps vary (tasks, clip lengths, DMD's generator and critic iterations) and
must stay free of host syncs, so this callback keeps Lightning's `Throughput` arithmetic but:
- counts FLOPs per forward as they happen (`ModelFlops`: a forward hook on every AVTransformer of
  the module, from the layout's shapes, times 3 when the network trains);
- synchronises the device only on logging steps (every `trainer.log_every_n_steps`), so the time
  between two logs covers all steps in between, and restarts its clock after the other
  callbacks of a logging step (samples, checkpoints) have run.
Metrics (this device): perf/tokens_per_sec, perf/samples_per_sec, perf/tflops_per_sec,
perf/seconds_per_step, perf/mfu (when the peak is known: `run.peak_flops`, else DENSE_PEAK_FLOPS
below or Lightning's table for the GPU), perf/max_memory_allocated_gb (GPU).
"""

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

from model import AVTransformer
from train.flops import forward_flops


class ModelFlops:
    """Model FLOPs of every forward of the module's AVTransformers while `counting` is on."""

    def __init__(self, module: torch.nn.Module):
        self.total = 0.0
        self.counting = False
        self._handles = [m.register_forward_hook(self._count, with_kwargs=True) for m in module.modules() if isinstance(m, AVTransformer)]

    def _count(self, net, args, kwargs, output):
        if not self.counting:
            return
        inputs = args[0] if args else kwargs["inputs"]
        layout = args[1] if len(args) > 1 else kwargs["layout"]
        stop = kwargs.get("stop_after_block")  # a forward that stops early (the critic's GAN features)
        flops = forward_flops(layout, inputs[0].shape[0], None if stop is None else stop + 1, net.video_window)
        if torch.is_grad_enabled():
            # The backward: weight and input gradients (2x forward) when the network trains, only
            # input gradients (1x) when it is frozen but sits between a loss and a trained network
            # (DMD's GAN term through the critic).
            trains = next(net.blocks.parameters()).requires_grad
            flops *= 3 if trains else 2
        self.total += flops

    def remove(self):
        for h in self._handles:
            h.remove()


# Dense bf16/fp16 tensor-core peaks where Lightning's table has none or a wrong one: nvidia-smi
# names the H200 SXM plainly "NVIDIA H200", which matches no entry of Lightning 2.6's table (so
# perf/mfu was missing on the H200), and its "h200 sxm1" entry, 2.0e15, is the datasheet's figure
# with 2:4 sparsity. The H200's dense rate is the H100 SXM's (same chip, same clocks). (Lightning's
# "h100 nvl" entry, 1978.8e12, looks like a sparse figure too; left as is, no such card was seen.)
DENSE_PEAK_FLOPS = {"NVIDIA H200": 989.4e12}


def peak_flops(device: torch.device, dtype) -> float | None:
    """The peak FLOP/s MFU is taken against: ours for the GPUs above, else Lightning's table."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        dense = DENSE_PEAK_FLOPS.get(torch.cuda.get_device_name(device))
        if dense is not None:
            return dense
    return get_available_flops(device, dtype)


class ThroughputCallback(L.Callback):
    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self._flops: ModelFlops | None = None

    def setup(self, trainer, pl_module, stage):
        peak = self.peak_flops
        if peak is None:
            peak = peak_flops(trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin))
        # window 2: every logged rate covers the steps since the previous log
        self._throughput = Throughput(available_flops=peak, world_size=1, window_size=2)
        self._restart = True
        self._last_logged = -1

    def on_train_start(self, trainer, pl_module):
        # Here, not in setup: the modules build their networks in configure_model, after setup.
        self._flops = ModelFlops(pl_module)

    def teardown(self, trainer, pl_module, stage):
        if self._flops is not None:
            self._flops.remove()
            self._flops = None

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._restart:  # first step, or the step after a log: start the clock here
            self._restart = False
            self._t0 = self._now(trainer)
            self._batches = self._samples = self._tokens = 0
            self._throughput.reset()
            self._throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0.0)
            self._flops.total = 0.0
        self._flops.counting = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._flops.counting = False
        self._batches += 1
        self._samples += int(getattr(pl_module, "samples_in_step", 0))
        self._tokens += int(getattr(pl_module, "tokens_in_step", 0))
        step = trainer.global_step
        if step % trainer.log_every_n_steps or step == self._last_logged:
            return
        self._last_logged = step
        self._throughput.update(
            time=self._now(trainer) - self._t0, batches=self._batches, samples=self._samples, lengths=self._tokens,
            flops=self._flops.total,
        )
        m = self._throughput.compute()
        metrics = {
            "perf/samples_per_sec": m["device/samples_per_sec"],
            "perf/tokens_per_sec": m["device/items_per_sec"],
            "perf/tflops_per_sec": m["device/flops_per_sec"] / 1e12,
            "perf/seconds_per_step": 1.0 / m["device/batches_per_sec"],
        }
        if "device/mfu" in m:
            metrics["perf/mfu"] = m["device/mfu"]
        if trainer.strategy.root_device.type == "cuda":  # the high-water mark of this GPU so far
            metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
        for logger in trainer.loggers:  # rank-zero-only inside Lightning's loggers
            logger.log_metrics(metrics, step=step)
        self._restart = True
