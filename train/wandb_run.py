"""The W&B logger of a run: offline unless told otherwise, the same run id across resumes, the
resolved config logged once."""

import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from data.atomic import written_whole


def build_loggers(cfg: DictConfig, run_dir: Path, resolved_config: dict, resuming: bool) -> list:
    """W&B plus a plain CSV copy of the metrics (<run_dir>/metrics/version_N/metrics.csv, one
    version per launch), readable without W&B."""
    csv = CSVLogger(save_dir=str(run_dir), name="metrics")
    wandb = build_wandb_logger(cfg, run_dir, resolved_config, resuming)
    return [wandb, csv] if wandb is not None else [csv]


def build_wandb_logger(cfg: DictConfig, run_dir: Path, resolved_config: dict, resuming: bool) -> WandbLogger | None:
    """cfg: the `logger` config group (project, name, mode, tags). WANDB_MODE in the environment
    wins over cfg.mode, so `WANDB_MODE=online python -m train ...` uploads live."""
    mode = os.environ.get("WANDB_MODE", cfg.mode)
    if mode == "dryrun":  # W&B's old name for offline; wandb itself sets it for the ranks it starts
        mode = "offline"
    if mode not in ("offline", "online", "disabled"):
        from train.config import ConfigError

        raise ConfigError(f"logger.mode={mode!r}: choose offline, online or disabled")
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = wandb_run_id(run_dir)
    logger = WandbLogger(
        project=cfg.project,
        name=cfg.name or run_dir.name,
        id=run_id,
        save_dir=str(run_dir),
        offline=mode == "offline",
        resume="allow",
        tags=list(cfg.get("tags") or []),
    )
    if not resuming:
        logger.log_hyperparams(resolved_config)
    return logger


def wandb_run_id(run_dir: Path) -> str | None:
    """One W&B run per run directory: a resumed run (same run_dir) continues the same W&B run,
    whose id is kept in <run_dir>/wandb_run_id. Only global rank 0 logs to W&B, so only it makes
    the id: under srun or torchrun every rank starts at once, and ranks that each wrote an id of
    their own could leave another rank's in the file (the next start would then open a new run).
    The file is written whole (data/atomic.py). Other ranks get the id if it is
    there, else None (they never open the run)."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    if rank_zero_only.rank != 0:
        return None
    run_id = uuid.uuid4().hex[:12]
    with written_whole(id_file) as partial:
        Path(partial).write_text(run_id)
    return run_id
