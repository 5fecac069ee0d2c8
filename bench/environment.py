"""What a benchmark result must say about where it ran: device, versions, command, date."""

import datetime
import json
import platform
import sys
from pathlib import Path

import lightning
import torch


def describe(device: torch.device, argv: list[str]) -> dict:
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None},
    }


def slug(device: torch.device) -> str:
    """Short device name for result file names: h100, h200, cpu."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for chip in ("h200", "h100", "a100", "b200"):
        if chip in name:
            return chip
    return name.replace(" ", "_")


def write(result: dict, out_dir, stem: str, table: str) -> None:
    """<stem>.json (everything) and <stem>.md (the table, with device, versions and command)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    header = (f"Device: {result['device']}; torch {result['versions']['torch']}, lightning {result['versions']['lightning']}, "
              f"CUDA {result['versions']['cuda']}, cuDNN {result['versions']['cudnn']}; {result['date']}.\n\n"
              f"Command: `{result['command']}`\n\n")
    (out / f"{stem}.md").write_text(header + table + "\n")
    print(table)
    print(f"\nwrote {out / (stem + '.json')} and .md", file=sys.stderr)
