"""Memory per GPU and step time of the runs bench/device/check.sh presets made, from their CSV
metrics (the perf/* that ThroughputCallback logs in every run).

    python bench/device/preset_runs.py RUNS_DIR OUT_DIR    # writes OUT_DIR/preset_runs.{json,md}

Per run: the median of perf/seconds_per_step over the logged windows after the first (the first
holds compilation), tokens/s and TFLOP/s likewise, the highest perf/max_memory_allocated_gb, the
last logged step, and whether the run exported its weights (it finished).
"""

import csv
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.environment import describe, write  # noqa: E402


def summarize(run: Path) -> dict:
    rows = [r for f in sorted(run.glob("metrics/version_*/metrics.csv")) for r in csv.DictReader(f.open())]
    perf = [r for r in rows if r.get("perf/seconds_per_step")]
    overrides = run / ".hydra" / "overrides.yaml"  # the command line of the run, as Hydra saved it
    summary = {"run": run.name, "finished": (run / "export" / "model.safetensors").is_file(),
               "last_step": max((int(r["step"]) for r in rows if r.get("step")), default=None), "perf_windows": len(perf),
               "overrides": overrides.read_text().splitlines() if overrides.is_file() else None}
    if not perf:
        return summary
    steady = perf[1:] or perf

    def median(key):
        values = [float(r[key]) for r in steady if r.get(key)]
        return statistics.median(values) if values else None

    memory = [float(r["perf/max_memory_allocated_gb"]) for r in perf if r.get("perf/max_memory_allocated_gb")]
    return {**summary, "seconds_per_step": median("perf/seconds_per_step"), "tokens_per_sec": median("perf/tokens_per_sec"),
            "tflops_per_sec": median("perf/tflops_per_sec"), "mfu": median("perf/mfu"),
            "max_memory_allocated_gb": max(memory) if memory else None}


def table(rows: list[dict]) -> str:
    lines = ["| run | finished | last step | s/step | tokens/s | TFLOP/s | MFU | max allocated GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        lines.append(f"| {r['run']} | {r['finished']} | {r['last_step']} | {fmt(r.get('seconds_per_step'), '.4f')} | "
                     f"{fmt(r.get('tokens_per_sec'), '.0f')} | {fmt(r.get('tflops_per_sec'), '.4g')} | {fmt(r.get('mfu'), '.3f')} | "
                     f"{fmt(r.get('max_memory_allocated_gb'), '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    runs_dir, out_dir = (sys.argv[1:] if argv is None else argv)
    rows = [summarize(run) for run in sorted(Path(runs_dir).iterdir()) if run.is_dir()]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"benchmark": "preset_runs", **describe(device, ["bench/device/preset_runs.py", runs_dir, out_dir]),
              "made_by": "bash bench/device/check.sh presets", "results": rows}
    write(result, out_dir, "preset_runs", table(rows))
    return result


if __name__ == "__main__":
    main()
