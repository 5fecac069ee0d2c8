"""Turn a folder of media files into WebDataset shards of bounded size, plus a report of every
file that could not be used and why.

    python -m data.shards --input videos/ --output shards/ [--max-shard-bytes 1000000000] [--captions captions.csv]

Accepted media: mp4, mov, mkv, webm (stored as they are, under their own extension; the loader
decodes any of them). Captions: --captions CSV (columns file, caption[, language]), else a
sidecar <name>.json ({"caption": ...} or {"captions": {lang: ...}}, other fields are kept in the
sample's json) or <name>.txt next to the file. Every file under --input is either written or
listed in <output>/report.json with its reason; nothing is dropped silently.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter

from data.caption_sources import SIDECAR_EXTENSIONS, CaptionSources
from data.media import MEDIA_EXTENSIONS
from data.probe import probe_media
from data.shard_writer import BoundedShardWriter
from data.skips import REASONS, SkipSample

REPORT_NAME = "report.json"


def find_files(root: str) -> list[str]:
    """Every file under root, as sorted paths relative to root."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            found.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(found)


def extension(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def sample_key(relative_path: str, taken: set[str]) -> str:
    """A webdataset key from the file's path: no dots (webdataset splits key and extension at
    the first dot), no slashes, at most 80 characters, unique."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(relative_path)[0])[-80:]
    unique, n = key, 1
    while unique in taken:
        n += 1
        unique = f"{key[-74:]}_{n}"
    taken.add(unique)
    return unique


def sample_meta(relative_path: str, captions: dict[str, str], extra: dict, info: dict) -> dict:
    return {**extra, "captions": captions, "languages": sorted(captions), **info, "source": relative_path,
            "container": extension(relative_path)}


def write_shards(input_dir: str, output_dir: str, max_shard_bytes: int = 1_000_000_000,
                 captions_csv: str | None = None, prefix: str = "shard") -> dict:
    """Write the shards and <output_dir>/report.json; returns the report."""
    csv_inside = os.path.relpath(os.path.abspath(captions_csv), os.path.abspath(input_dir)) if captions_csv else None
    files = [f for f in find_files(input_dir) if f != csv_inside]
    media = [f for f in files if extension(f) in MEDIA_EXTENSIONS]
    media_set = set(media)
    stems_with_media = {os.path.splitext(f)[0] for f in media}
    sources = CaptionSources(input_dir, captions_csv)
    writer = BoundedShardWriter(output_dir, prefix, max_shard_bytes)
    skipped: list[dict] = []
    keys: set[str] = set()

    for relative in files:
        if relative in media_set:
            continue
        if extension(relative) in SIDECAR_EXTENSIONS and os.path.splitext(relative)[0] in stems_with_media:
            continue  # a sidecar, read with its media file
        skipped.append({"file": relative, "reason": "not_media",
                        "detail": f"extension .{extension(relative)} is not one of {', '.join(MEDIA_EXTENSIONS)} "
                                  f"and the file is not a caption sidecar of a media file"})

    for relative in media:
        try:
            captions, extra = sources.lookup(relative)
        except (ValueError, UnicodeDecodeError) as error:
            skipped.append({"file": relative, "reason": "bad_json", "detail": str(error)})
            continue
        with open(os.path.join(input_dir, relative), "rb") as f:
            data = f.read()
        try:
            info = probe_media(data)
            if not captions:
                raise SkipSample("no_caption", "no CSV row, sidecar .json or .txt with a caption")
        except SkipSample as skip:
            skipped.append({"file": relative, "reason": skip.reason, "detail": skip.detail})
            continue
        meta = sample_meta(relative, captions, extra, info)
        writer.write(sample_key(relative, keys), {extension(relative): data,
                                                   "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})

    shards = writer.close()
    report = {
        "input": os.path.abspath(input_dir),
        "output": os.path.abspath(output_dir),
        "files_seen": len(files),
        "written": sum(shard["samples"] for shard in shards),
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped_files": [dict(s, what_to_do=REASONS[s["reason"]]) for s in skipped],
        "oversize_samples": writer.oversize,
        "max_shard_bytes": max_shard_bytes,
        "shards": [dict(shard, path=os.path.basename(shard["path"])) for shard in shards],
    }
    with open(os.path.join(output_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    return report


def print_summary(report: dict) -> None:
    print(f"{report['files_seen']} files: {report['written']} written into {len(report['shards'])} shards, "
          f"{report['skipped']} skipped")
    for reason, count in report["skipped_by_reason"].items():
        print(f"  {reason}: {count}  ({REASONS[reason]})")
    for key in report["oversize_samples"]:
        print(f"  warning: sample {key} alone exceeds --max-shard-bytes and has a shard of its own")
    print(f"report: {os.path.join(report['output'], REPORT_NAME)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder of media files (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for the .tar shards and report.json")
    parser.add_argument("--max-shard-bytes", type=int, default=1_000_000_000, help="upper bound of a shard's size")
    parser.add_argument("--captions", default=None, help="CSV with columns file, caption[, language]")
    parser.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input} is not a folder")
    report = write_shards(args.input, args.output, args.max_shard_bytes, args.captions, args.prefix)
    print_summary(report)
    if report["written"] == 0:
        print("error: no usable files; see the reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
