"""The data pipeline as a LightningDataModule: builds the rank's streaming loader, watches the
batches go by (skip counts, stream position) and saves the position in checkpoints, so a resumed
run continues the stream instead of restarting the epoch."""

import dataclasses
import json
from pathlib import Path

import lightning as L

from data.config import LoaderConfig, SyntheticConfig
from data.loader import build_loader
from data.state import StreamState
from data.synthetic import SYNTHETIC_RECORD, synthetic_shard_paths, write_synthetic_shards
from train.config import ConfigError
from train.distributed import gather_per_rank, own_entry


def prepare_synthetic(synthetic: SyntheticConfig, loader: LoaderConfig) -> None:
    """Write the synthetic dataset into loader.shards when it is not there. A set begun with this
    same config and not finished (a run stopped while writing it) is completed; the set is
    deterministic, so the shards already there are kept. A set of another making (other options,
    `python -m data.synthetic`, or written before the config was recorded) is used as it is."""
    out = Path(loader.shards)
    expected = [Path(p) for p in synthetic_shard_paths(synthetic, str(out))]
    present = sorted(out.glob("*.tar")) if out.is_dir() else []
    missing = [p for p in expected if p not in present]
    if not missing:
        return
    record = out / SYNTHETIC_RECORD
    begun_here = record.is_file() and json.loads(record.read_text()) == dataclasses.asdict(synthetic)
    if present and not begun_here:
        print(f"{out} holds {len(present)} shards that data.synthetic did not write ({present[0].name} ...): "
              f"training on them as they are", flush=True)
        return
    print(f"writing the synthetic dataset ({synthetic.num_clips} clips, {len(missing)} of {len(expected)} shards) to {out} ...", flush=True)
    write_synthetic_shards(synthetic, str(out), only_missing=True)


class AVDataModule(L.LightningDataModule):
    def __init__(self, cfg: LoaderConfig):
        super().__init__()
        self.cfg = cfg
        self.stream = StreamState()

    def train_dataloader(self):
        resume = self.stream.state_dict() if self.stream.layout is not None else None
        try:
            return build_loader(self.cfg, self.trainer.global_rank, self.trainer.world_size, resume=resume)
        except ValueError as e:  # e.g. fewer shards than ranks x workers: the message says what to do
            raise ConfigError(f"data.loader: {e}") from None

    def on_before_batch_transfer(self, batch, dataloader_idx):
        # Lightning calls this for the batch about to be trained on (not for the one it
        # prefetched), so the recorded position is the consumed one.
        self.stream.update(batch)
        return batch

    def skip_counts(self) -> dict[str, int]:
        return self.stream.skip_counts()

    def state_dict(self):
        # Every rank reads its own shards: all ranks' positions go into the checkpoint.
        return {"streams": gather_per_rank(self.stream.state_dict())}

    def load_state_dict(self, state):
        if "stream" in state:  # a single-process checkpoint from before per-rank streams
            state = {"streams": [state["stream"]]}
        self.stream.load_state_dict(own_entry(state["streams"], self.trainer.global_rank, self.trainer.world_size, "the data stream"))
