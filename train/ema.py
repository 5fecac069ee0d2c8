"""Exponential moving average of a module's trainable weights, kept in float32.

Kept by hand rather than with torch.optim.swa_utils.AveragedModel: that deep-copies the whole
module, which a sharded (ZeRO-3) model cannot do; this keeps one float32 tensor per local
parameter and works on whatever the rank holds: the whole parameter, or under ZeRO-3 the rank's
flat partition (`p.ds_tensor`; the parameter itself is then an empty placeholder between
forwards). Under ZeRO-3 each rank's checkpoint file holds its own shards (DeepSpeed writes one
model-states file per rank, with the client state, and each rank loads its own)."""

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def local_view(p: torch.Tensor) -> torch.Tensor:
    """The part of parameter p this rank holds. Under ZeRO-3 that is p.ds_tensor, the partition the
    optimizer writes; p itself is filled only while gathered for a forward (small "persistent"
    parameters stay gathered through forward and backward, and are partitioned for the step)."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def is_gathered_zero3(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter that is gathered right now (small "persistent" ones stay gathered
    between forwards): forwards read p itself, not its partition."""
    return hasattr(p, "ds_tensor") and p.numel() > 0


def whole_from_partitions(p: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose ZeRO-3 partitions (one per rank, like p.ds_tensor: consecutive
    slices of the flattened parameter, padded at the end) are `partition` on each rank.
    Collective over p's process group."""
    group = p.ds_process_group
    parts = [torch.empty_like(partition) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, partition.contiguous(), group=group)
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


class EMA:
    """decay: per optimizer step. every: fold the weights in every `every` steps (ema-pytorch's
    update_every), with the decay of the steps since the last fold, decay**k past the warm-up: the
    EMA of weights held for k steps. It reads and writes every trainable weight in float32 (one
    more pass over the parameters, like the optimizer's): 11 ms of the 2.58B-parameter proxy's
    0.46 s step on an H100 at every=1 (lease 4, docs/performance.md). Between folds the shadow
    lags the weights by at most every - 1 steps, against the 1 / (1 - decay) steps it averages."""

    def __init__(self, module: nn.Module, decay: float, every: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay}: must be in [0, 1)")
        if every < 1:
            raise ValueError(f"ema every={every}: must be >= 1")
        self.decay, self.every = decay, every
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        # Names are taken now, before activation checkpointing or compile wrap the blocks and
        # rename their parameters; the Parameter objects themselves survive the wrapping.
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0  # optimizer steps seen
        self.folded = 0  # of them, those folded into the shadow
        self._pending = False  # shadow to be taken from the partitions at the first update

    def bind(self, device) -> "EMA":
        """Call once training has set up the parameters (on fit start). When ZeRO-3 partitioned
        them after this EMA was built, the whole-parameter shadow no longer matches what the rank
        holds; it is then re-taken from the partitions at the first update, right after the first
        optimizer step, when every partition is written (before it, persistent parameters'
        partitions are not). A shadow loaded from a checkpoint already matches."""
        views = [local_view(p) for p in self.params]
        if any(s.shape != v.shape for s, v in zip(self.shadow, views)):
            if self.updates:
                raise RuntimeError("EMA: the parameters were re-partitioned after EMA updates; resume with the same strategy and world size")
            self._pending = True
        return self.to(device)

    def current_decay(self, step: int | None = None) -> float:
        """The decay at optimizer step `step` (default: the next one). Warm-up: (1 + n) / (10 + n)
        until it reaches `decay`. Without it a 0.999 EMA after 400 steps still holds 67% of the
        initial weights (zero output heads: it samples noise)."""
        n = self.updates if step is None else step
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self):
        """Call after every optimizer step; folds the weights in at every `every`-th step (and at
        the first, when ZeRO-3 re-takes the shadow)."""
        self.updates += 1
        # at multiples of `every`, whatever the first fold was: ZeRO-3's re-take at step 1 must not
        # shift the folds (and so the exported EMA) against ZeRO-2's
        if not self._pending and self.updates % self.every:
            return
        current = [local_view(p).detach().float() for p in self.params]
        if self._pending:
            self.shadow, self._pending = [c.clone() for c in current], False
        decay = math.prod(self.current_decay(n) for n in range(self.folded, self.updates))
        torch._foreach_lerp_(self.shadow, current, 1.0 - decay)
        self.folded = self.updates

    @torch.no_grad()
    def copy_to(self):
        for p, s in zip(self.params, self.shadow):
            local_view(p).copy_(s.to(p.dtype))
            if is_gathered_zero3(p):  # also the gathered copy, which is what forwards read
                p.data.copy_(whole_from_partitions(p, s).to(p.dtype))

    @contextmanager
    def swapped_in(self):
        """Use the EMA weights inside the block (sampling), restore the trained ones after."""
        backup = [local_view(p).detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    local_view(p).copy_(b)
                    if is_gathered_zero3(p):  # gathered during the block: holds EMA values
                        p.data.copy_(whole_from_partitions(p, b).to(p.dtype))

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Whole EMA weights by name (not under ZeRO-3, where the shadow holds partitions: swap
        them in and gather the parameters instead, see train/strategy.py full_weights)."""
        return dict(zip(self.names, self.shadow))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "folded": self.folded, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict):
        missing = [n for n in self.names if n not in state["shadow"]]
        if missing:
            raise ValueError(f"EMA state: missing {len(missing)} weights, e.g. {missing[:3]}; was it saved from another model config?")
        # Under ZeRO-3 these are the rank's partitions (DeepSpeed loads the checkpoint after bind()).
        self.shadow = [state["shadow"][n].float().to(s.device) for n, s in zip(self.names, self.shadow)]
        self.updates = int(state.get("updates", 0))
        self.folded = int(state.get("folded", self.updates))  # checkpoints before `every` folded every step
        self._pending = False  # under DeepSpeed the checkpoint is loaded after bind()

    def to(self, device):
        self.shadow = [s.to(device) for s in self.shadow]
        return self
