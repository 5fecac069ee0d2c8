"""`python -m train <stage> [hydra overrides]`: the one entry point.

The first argument picks the stage (and its config, conf/<stage>.yaml); everything after it is
Hydra's. Config becomes plain objects here and nowhere else. User mistakes (a bad option, a
missing file) end in one line on stderr and exit code 2, not a traceback.
"""

import os
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGE_ENV = "AVGEN_STAGE"

STAGES = {
    "pretrain": "flow-matching pretraining of the audio-video transformer (conf/pretrain.yaml)",
    "distill": "DMD-2 distillation of a pretrained teacher into an 8-step student (conf/distill.yaml)",
    "sample": "generate an mp4 with audio from a checkpoint (conf/sample.yaml)",
}

USAGE = "usage: python -m train <stage> [key=value ...] [--help]\n\nstages:\n" + "\n".join(
    f"  {name:<9} {text}" for name, text in STAGES.items()
) + "\n\nExamples:\n  python -m train pretrain trainer.max_steps=20\n  python -m train sample ckpt=runs/x/export/model.safetensors prompt=\"a red ball bounces\" steps=50 cfg=5.0\n  python -m train distill teacher=runs/x/export/model.safetensors\n  python -m train pretrain --help   (Hydra's help: config groups and options)"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != [os.environ.get(STAGE_ENV)] and os.environ.get(STAGE_ENV) in STAGES and "LOCAL_RANK" in os.environ:
        # A rank Lightning started from this process (devices > 1 on one machine): it re-runs
        # `python -m train <hydra overrides>` without the stage, which arrives in the environment.
        argv = [os.environ[STAGE_ENV], *argv]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    stage = argv[0]
    if stage not in STAGES:
        fail(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    run_stage(stage, argv[1:])


def run_stage(stage: str, overrides: list[str]) -> None:
    import hydra

    from train import stages

    task = getattr(stages, f"run_{stage}")

    def guarded(cfg):
        from hydra.errors import InstantiationException
        from omegaconf.errors import OmegaConfBaseException

        from train.config import ConfigError
        from train.distill import NonFiniteLossError

        try:
            return task(cfg)
        except (ConfigError, FileNotFoundError) as e:
            fail(str(e))
        except NonFiniteLossError as e:  # the run stopped itself; the checkpoints before it remain
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except InstantiationException as e:
            fail(str(e).replace("\n", " "))
        except OmegaConfBaseException as e:
            fail(str(e).replace("\n", " "))

    os.environ[STAGE_ENV] = stage  # for the ranks Lightning launches as subprocesses (see main)
    sys.argv = [f"python -m train {stage}", *overrides]
    hydra.main(config_path=str(CONF_DIR), config_name=stage, version_base="1.3")(guarded)()
