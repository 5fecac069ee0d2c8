"""Per-rank state in a checkpoint that only one rank writes.

Lightning (DDP, ZeRO-1/2) writes the checkpoint from rank 0, so state that differs per rank (the
position of each rank's data stream, each rank's RNG) is gathered to every rank first and saved
as a list indexed by rank; on resume each rank takes its own entry. The gather is a collective:
every rank calls it, which holds because every rank builds the checkpoint dict before rank 0
writes it."""

import io

import torch
import torch.distributed as dist

from train.config import ConfigError


def gather_per_rank(state) -> list:
    """[state of rank 0, state of rank 1, ...]; [state] when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    # Through torch.save bytes: all_gather_object's own pickling of tensors fails to load back
    # (torch 2.11, gloo: "UntypedStorage has no attribute dtype").
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payloads = [None] * dist.get_world_size()
    dist.all_gather_object(payloads, buffer.getvalue())
    return [torch.load(io.BytesIO(p), weights_only=True) for p in payloads]


def own_entry(states: list, rank: int, world_size: int, what: str):
    """This rank's entry of a gathered list, after checking the world size did not change."""
    if len(states) != world_size:
        raise ConfigError(
            f"{what} was saved by {len(states)} ranks but this run has {world_size}; resume with the same number "
            "of processes (or start a fresh run from the export)"
        )
    return states[rank]
