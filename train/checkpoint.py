"""Consolidated weights: export to safetensors, and load a generator from an export or a
Lightning checkpoint (EMA weights when present). The model/codec/data description travels in the
file, so `sample` and `distill` rebuild exactly the network that was trained. Also the on-disk
life of training checkpoints: written whole or not at all, the newest kept, the newest found."""

import glob
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

from data.atomic import written_whole
from model import AVTransformer, ModelArgs
from model.window import VideoWindow
from train.codec import PatchCodec
from train.config import ConfigError

# Prefixes that activation checkpointing and torch.compile add to parameter names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def describe(args: ModelArgs, codec: PatchCodec, fps: float, sample_rate: int, audio_channels: int, text_len: int, shift_args) -> dict:
    """What a checkpoint must carry to rebuild and sample the generator."""
    return {
        "model": asdict(args),
        "codec": codec.config(),
        "data": {"fps": fps, "sample_rate": sample_rate, "audio_channels": audio_channels},
        "text_len": text_len,
        "shift_args": list(shift_args),
    }


def model_args(meta: dict) -> ModelArgs:
    """The ModelArgs a checkpoint's model was trained with. Files written before
    ModelArgs.text_padding existed padded captions on the right."""
    return ModelArgs(**{"text_padding": "right", **meta["model"]})


def written_at(checkpoint: Path) -> float:
    """When a checkpoint was last written: a file's mtime, or the newest file in a ZeRO checkpoint
    directory (re-saving last.ckpt overwrites files in it and leaves the directory's own mtime)."""
    if checkpoint.is_dir():
        return max((f.stat().st_mtime for f in checkpoint.rglob("*") if f.is_file()), default=checkpoint.stat().st_mtime)
    return checkpoint.stat().st_mtime


def replace_directory_atomically(path: Path, write, barrier, is_rank_zero: bool) -> None:
    """Write the directory `path` whole or not at all, from every rank of a process group:
    `write(tmp)` runs on every rank into `<path>.partial`; once all have written (barrier), rank 0
    moves the old `path` aside to `<path>.old`, renames the new one into place and removes the
    old. A run killed at any point leaves `path` either as it was or as it is meant to be (or,
    between the two renames, absent: resume=auto, which reads only `*.ckpt`, then takes the
    newest other checkpoint). Leftovers of an interrupted save are removed by the next one."""
    partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    if is_rank_zero:
        remove_path(partial)
        remove_path(old)
    barrier()
    write(partial)
    barrier()  # every rank's part is on disk
    if is_rank_zero:
        if path.exists():
            path.rename(old)
        partial.rename(path)
        remove_path(old)
    barrier()


class SameDirectoryCheckpointIO(TorchCheckpointIO):
    """Lightning's single-file checkpoints (DDP, one process), written whole or not at all: into a
    temporary file next to the target, then renamed over it (data/atomic.py). Lightning's own
    writer stages the file in $TMPDIR (fsspec's transaction), and a rename from a local /tmp into
    a shared run directory is a copy: a kill during it left a torn last.ckpt, the newest file, which
    resume=auto would take. A leftover of a killed save is no `*.ckpt` (resume=auto never reads
    it) and the next save of that checkpoint removes it."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # Lightning's message / a remote store: its writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.glob(f"{glob.escape(path.name)}.*.partial"):
            leftover.unlink(missing_ok=True)
        with written_whole(path) as partial:
            torch.save(checkpoint, partial)


def prune_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` periodic checkpoints (`*step=N*.ckpt`, not last.ckpt) in
    `directory`, judged by step and then by write time, so a run that was resumed, or
    whose keep_checkpoints changed, is pruned by what is on disk. Each is renamed out of the
    `*.ckpt` names before it is deleted: a kill mid-delete leaves a `.deleting` leftover that
    resume=auto never reads and the next call removes. Returns what was removed."""
    for leftover in directory.glob("*.ckpt.deleting"):
        remove_path(leftover)
    steps = {p: int(m[1]) for p in directory.glob("*.ckpt") if (m := re.search(r"step=(\d+)", p.name))}
    periodic = sorted(steps, key=lambda p: (steps[p], written_at(p)))
    removed = periodic[:-keep] if keep else []
    for old in removed:
        doomed = old.with_name(old.name + ".deleting")
        old.rename(doomed)
        remove_path(doomed)
    return removed


def remove_path(path: Path) -> None:
    """A directory with what is in it, or a file (a single-file checkpoint of another strategy)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def export_safetensors(path, weights: dict[str, torch.Tensor], meta: dict, step: int, source: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {clean_name(k): v.detach().to("cpu").contiguous() for k, v in weights.items()}
    # Whole or not at all: a run killed while writing 30 GB leaves the previous export (or none),
    # not a torn file that a later `sample` or `distill` would fail on.
    with written_whole(path) as partial:
        save_file(tensors, partial, metadata={"avgen": json.dumps(meta), "step": str(step), "weights": source})
    return path


def export_weights(model, ema, keep: bool) -> tuple[dict, str]:
    """(weights by name, "ema" or "raw") of a generator for export_safetensors: the EMA weights
    when kept. Every rank calls it (ZeRO-3 gathers collectively); ranks with keep=False get {}."""
    from train.strategy import full_weights, is_partitioned

    if ema is None:
        return full_weights(model, keep), "raw"
    if not is_partitioned(model):
        return (ema.named_weights() if keep else {}), "ema"
    with ema.swapped_in():  # ZeRO-3: put the EMA partitions in, gather whole weights
        return full_weights(model, keep), "ema"


class SafetensorsWeights(Mapping):
    """The tensors of a .safetensors file by name, each read from disk only when asked for: a
    partitioned model is loaded tensor by tensor on one rank, and no process holds the file."""

    def __init__(self, path: Path):
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]


def read_weights(path, option: str = "ckpt", lazy: bool = False) -> tuple[Mapping[str, torch.Tensor], dict, int]:
    """(weights with clean names, meta, step) from a .safetensors export or a Lightning .ckpt.
    option: the config option the path came from, for error messages. lazy: an export's tensors
    are read when used (SafetensorsWeights); a .ckpt is memory-mapped."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoint").is_dir():
        raise ConfigError(
            f"{option}={str(path)!r} is a DeepSpeed checkpoint directory (sharded); pass the run's export/model.safetensors, "
            f"or consolidate it first with {path / 'zero_to_fp32.py'}"
        )
    if not path.is_file():
        raise ConfigError(f"{option}={str(path)!r}: no such file; pass a .ckpt from <run_dir>/checkpoints or an export/*.safetensors")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "avgen" not in meta:
                raise ConfigError(f"{option}={str(path)!r}: not an avgen export (no 'avgen' metadata)")
            weights = SafetensorsWeights(path) if lazy else {k: f.get_tensor(k) for k in f.keys()}
        return weights, json.loads(meta["avgen"]), int(meta.get("step", 0))
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False, mmap=lazy)
    if "avgen" not in ckpt:
        raise ConfigError(f"{option}={str(path)!r}: not an avgen checkpoint (no 'avgen' entry)")
    if "ema" in ckpt:
        weights = dict(ckpt["ema"]["shadow"])
    else:  # the generator's raw weights: the pretrain module's `model`, a distill module's `student`
        prefix = "student." if "student" in ckpt["avgen"] else "model."
        weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return {clean_name(k): v for k, v in weights.items()}, ckpt["avgen"], int(ckpt.get("global_step", 0))


def check_fits(model: AVTransformer, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """ConfigError naming the keys and shapes where `weights` do not fit `model` (which may live on
    the meta device, or be partitioned): the check of load_into, before anything is built."""
    own = {clean_name(k): tuple(getattr(p, "ds_shape", p.shape)) for k, p in model.named_parameters()}
    theirs = {k: tuple(weights.shape(k) if hasattr(weights, "shape") else weights[k].shape) for k in weights}
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = [f"{k}: {theirs[k]} vs model {own[k]}" for k in own if k in theirs and theirs[k] != own[k]]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} keys, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}")
        if shapes:
            lines.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:3]}")
        raise ConfigError(f"{source}: weights do not fit the model config: " + "; ".join(lines))


def load_into(model: AVTransformer, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load (check_fits first). A model built partitioned (ZeRO-3) is filled one parameter
    at a time, gathered, from rank 0's read: the other ranks never read the tensors."""
    from train.strategy import is_partitioned

    check_fits(model, weights, source)
    params = {clean_name(k): p for k, p in model.named_parameters()}
    if is_partitioned(model):
        import deepspeed
        import torch.distributed as dist

        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    with torch.no_grad():
                        p.copy_(weights[name].to(p.dtype))
        return
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.dtype))


def load_generator(path, device="cpu", dtype: torch.dtype = torch.float32) -> tuple[AVTransformer, PatchCodec, dict, int]:
    """The generator of an export or checkpoint, for sampling: built on the device in `dtype` and
    filled from the file one tensor at a time (lazily read), so a 15B model sampled in bf16 never
    exists in float32 or whole in host memory."""
    weights, meta, step = read_weights(path, lazy=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AVTransformer(model_args(meta))
    finally:
        torch.set_default_dtype(default)
    load_into(model, weights, f"ckpt={str(path)!r}")
    # A student distilled with windowed attention samples with it (model/window.py).
    model.video_window = VideoWindow.parse((meta.get("student") or {}).get("video_window"))
    return model.eval(), PatchCodec(**meta["codec"]), meta, step
