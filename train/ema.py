"""Exponential moving average of a module's trainable weights, kept in float32.

Kept by hand rather than with torch.optim.swa_utils.AveragedModel: that deep-copies the whole
module, which a sharded (ZeRO-3) model cannot do; this keeps one float32 tensor per local
parameter and works on whatever the rank holds."""

from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay}: must be in [0, 1)")
        self.decay = decay
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        # Names are taken now, before activation checkpointing or compile wrap the blocks and
        # rename their parameters; the Parameter objects themselves survive the wrapping.
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        """Warm-up: (1 + n) / (10 + n) until it reaches `decay`. Without it a 0.999 EMA after
        400 steps still holds 67% of the initial weights (zero output heads: it samples noise)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self):
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.current_decay())
        self.updates += 1

    @torch.no_grad()
    def copy_to(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))

    @contextmanager
    def swapped_in(self):
        """Use the EMA weights inside the block (sampling), restore the trained ones after."""
        backup = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def named_weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict):
        missing = [n for n in self.names if n not in state["shadow"]]
        if missing:
            raise ValueError(f"EMA state: missing {len(missing)} weights, e.g. {missing[:3]}; was it saved from another model config?")
        self.shadow = [state["shadow"][n].float().to(s.device) for n, s in zip(self.names, self.shadow)]
        self.updates = int(state.get("updates", 0))

    def to(self, device):
        self.shadow = [s.to(device) for s in self.shadow]
        return self
