"""Where the shard writer finds a media file's captions: a CSV given on the command line, else a
sidecar next to the file (same name, .json or .txt)."""

import csv
import json
import os

from data.captions import UNKNOWN_LANGUAGE, captions_of

SIDECAR_EXTENSIONS = ("json", "txt")


def read_caption_csv(path: str) -> dict[str, dict[str, str]]:
    """CSV with columns 'file' and 'caption' (optional 'language'; several rows per file give
    several languages) -> file as written in the CSV -> {language: caption}."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "file" not in columns or "caption" not in columns:
            raise ValueError(f"--captions {path}: needs columns 'file' and 'caption' (optional 'language'), "
                             f"found {columns}")
        table: dict[str, dict[str, str]] = {}
        for row in reader:
            language = (row.get("language") or "").strip() or UNKNOWN_LANGUAGE
            text = (row["caption"] or "").strip()
            if text:
                table.setdefault(row["file"].strip(), {})[language] = text
    return table


class CaptionSources:
    """Captions and extra metadata for files under `root`."""

    def __init__(self, root: str, csv_path: str | None = None):
        self.root = root
        table = read_caption_csv(csv_path) if csv_path else {}
        # CSV rows may name a file by its path relative to root or by its bare name.
        self.by_path = {os.path.normpath(name): captions for name, captions in table.items()}

    def lookup(self, relative_path: str) -> tuple[dict[str, str], dict]:
        """({language: caption}, extra json fields from a sidecar .json). Empty captions when none."""
        extra: dict = {}
        sidecar_json = os.path.join(self.root, os.path.splitext(relative_path)[0] + ".json")
        if os.path.exists(sidecar_json):
            with open(sidecar_json, encoding="utf-8") as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict):
                raise ValueError(f"{sidecar_json}: expected a json object with 'caption' or 'captions'")
            extra = {k: v for k, v in loaded.items() if k not in ("caption", "captions", "language")}
        for name in (os.path.normpath(relative_path), os.path.basename(relative_path)):
            if name in self.by_path:
                return dict(self.by_path[name]), extra
        if os.path.exists(sidecar_json):
            return captions_of(loaded), extra
        sidecar_txt = os.path.join(self.root, os.path.splitext(relative_path)[0] + ".txt")
        if os.path.exists(sidecar_txt):
            with open(sidecar_txt, encoding="utf-8") as f:
                text = f.read().strip()
            return ({UNKNOWN_LANGUAGE: text} if text else {}), extra
        return {}, extra
