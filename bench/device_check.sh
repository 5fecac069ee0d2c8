#!/usr/bin/env bash
# The GPU checks of issues 6 and 7, in two parts that each fit one device call (< 10 minutes);
# both together fill most of a 15-minute lease. Each step has its own timeout, so a failure
# leaves the other steps' results. Not run yet: written in a session without a GPU.
#
#   device run (carry [".whl"]):  bash bench/device_check.sh perf      # ~6 min: issue 7
#                                 bash bench/device_check.sh presets   # ~5 min: issue 6, item 6
#   results:                      $OUT/*.json, *.md, log_*.txt  (copy into bench/results/)
#
# .whl must hold the wheels the device image lacks (hydra-core, omegaconf, antlr4-python3-runtime,
# av, webdataset, braceexpand, deepspeed and its needs, wandb and its needs): see the device README.
set -uo pipefail
part=${1:?usage: bench/device_check.sh perf|presets}
OUT=${OUT:-bench/results/device_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

if [ "$part" = perf ]; then
    # 7.1: the real training step of the proxy (hh15b width, 8 layers) at 16K and 32K tokens,
    # compiled (the first steps compile each block kind once per shape: hence the warm-up).
    timeout 270 python3 bench/train_step.py --preset proxy --tokens 16384 32768 --compile --ac none --steps 6 --warmup 3 \
        --out "$OUT" > "$OUT/log_train_step.txt" 2>&1 || echo "train_step failed: see log_train_step.txt"
    # 7.2: hh15b sampling latency, eager, layers timed at two depths and extrapolated to 40.
    timeout 200 python3 bench/sample.py --clips 1280x720x5 1920x1080x5 1920x1080x15 --repeats 1 --out "$OUT" \
        > "$OUT/log_sample.txt" 2>&1 || echo "sample failed: see log_sample.txt"
    exit 0
fi

# 6.6: the h100x8 preset on this one GPU, ZeRO-2 and ZeRO-3, a mid-size model, pretrain then
# distill with ZeRO-3 (one engine per network) from the pretrain export; memory and step time
# come from the CSV logs (perf/*).
# The synthetic set has 4 shards: at most 4 loader workers on one rank.
MID="data.loader.num_workers=2 model.dim=2048 model.n_heads=16 model.n_kv_heads=4 model.mlp_hidden=5632 model.n_modality_in=1 model.n_shared=8 model.n_modality_out=1"
for stage in zero2 zero3; do
    timeout 90 python3 -m train pretrain +cluster=h100x8 trainer.devices=1 strategy=$stage $MID \
        trainer.max_steps=200 trainer.log_every_n_steps=20 checkpoint_every_n_steps=200 sample.steps=4 \
        hydra.run.dir=/tmp/runs/pretrain_$stage > "$OUT/log_pretrain_$stage.txt" 2>&1 || echo "pretrain $stage failed"
done
timeout 90 python3 -m train distill +cluster=h100x8 trainer.devices=1 strategy=zero3 teacher=/tmp/runs/pretrain_zero2/export/model.safetensors \
    trainer.max_steps=100 trainer.log_every_n_steps=20 checkpoint_every_n_steps=100 data.loader.num_workers=2 \
    hydra.run.dir=/tmp/runs/distill > "$OUT/log_distill.txt" 2>&1 || echo "distill failed"
python3 - "$OUT" <<'EOF'
import csv, glob, json, sys
out = {}
for run in sorted(glob.glob("/tmp/runs/*")):
    rows = [r for f in glob.glob(f"{run}/metrics/version_*/metrics.csv") for r in csv.DictReader(open(f))]
    perf = [r for r in rows if r.get("perf/seconds_per_step")]
    out[run.split("/")[-1]] = {k: perf[-1][k] for k in perf[-1] if k.startswith("perf/")} if perf else "no perf rows"
json.dump(out, open(f"{sys.argv[1]}/preset_runs.json", "w"), indent=1)
print(json.dumps(out, indent=1))
EOF
