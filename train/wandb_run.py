"""The W&B logger of a run: offline unless told otherwise, the same run id across resumes, the
resolved config logged once."""

import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig


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
    id_file = run_dir / "wandb_run_id"
    # One W&B run per run directory: a resumed run (same run_dir) continues the same W&B run.
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
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
