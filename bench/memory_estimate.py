"""Estimated memory per GPU of the 15B model (conf/model/hh15b.yaml, parameters counted on the
meta device) under ZeRO-2 and ZeRO-3 on the h100x8 and h100x64 presets, for pretraining and for
distillation (student + critic trained, the teacher frozen and partitioned), with
train/memory.py's arithmetic, the same the presets' start-up check uses. An estimate, not a measurement: the
device runs of the presets are what confirm it.

    python bench/memory_estimate.py     # prints the table, writes bench/results/memory_estimate_hh15b.json
"""

import itertools
import json
import platform
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import count_parameters  # noqa: E402
from train.memory import TrainingSetup, estimate_distill_per_gpu, estimate_per_gpu  # noqa: E402

TOKENS = {"16K tokens": 16_384, "63K tokens (5 s 1080p)": 63_000}
GPUS = {"h100x64": 64, "h100x8": 8}


def main() -> dict:
    with torch.device("meta"):
        model = instantiate(OmegaConf.load(ROOT / "conf" / "model" / "hh15b.yaml"))
    n, args = count_parameters(model), model.args
    rows = []
    cases = itertools.product(
        (("pretrain", estimate_per_gpu), ("distill", estimate_distill_per_gpu)), GPUS.items(), (2, 3), TOKENS.items(),
        # offload: DeepSpeed's optimizer states in CPU memory (what one node needs to distil)
        ((True, False), (False, False), (True, True)),
    )
    for (training, estimate), (preset, gpus), stage, (tokens_name, tokens), (checkpointing, offload) in cases:
        est = estimate(TrainingSetup(n, args.n_layers, args.dim, tokens, stage, gpus, activation_checkpointing=checkpointing,
                                     offload_optimizer=offload))
        rows.append({"stage": training, "preset": preset, "gpus": gpus, "zero_stage": stage, "tokens": tokens_name,
                     "activation_checkpointing": checkpointing, "offload_optimizer": offload,
                     **{k: round(getattr(est, k), 1) for k in ("weights", "gradients", "optimizer", "ema", "activations", "frozen", "overhead", "total")}})
    result = {"what": "estimated GiB per GPU, hh15b, bf16-mixed, AdamW, fp32 EMA (train/memory.py); distill: student (+ EMA) "
                      "and critic trained, the teacher frozen (partitioned under ZeRO-3, a bf16 copy under ZeRO-2)", "parameters": n,
              "command": "python bench/memory_estimate.py", "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "rows": rows}
    out = ROOT / "bench" / "results" / "memory_estimate_hh15b.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"hh15b: {n / 1e9:.2f}B parameters; GiB per GPU (estimate)")
    for r in rows:
        print(f"{r['stage']:8} {r['preset']:8} ZeRO-{r['zero_stage']} {r['tokens']:24} AC={'on ' if r['activation_checkpointing'] else 'off'} "
              f"offload={'on ' if r['offload_optimizer'] else 'off'} "
              f"weights {r['weights']:5.1f} grads {r['gradients']:5.1f} optim {r['optimizer']:5.1f} ema {r['ema']:5.1f} "
              f"act {r['activations']:6.1f} frozen {r['frozen']:5.1f} total {r['total']:6.1f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
