"""The shard writer: a folder of media files -> bounded tar shards the loader reads, and a
report that accounts for every file it could not use."""

import json
import os
import tarfile

import pytest

from data.loader import build_loader
from data.shards import main as shards_main
from data.shards import sample_key, write_shards
from data_fixtures import corrupt_payload, loader_config, make_clip, noisy_clip, take, truncated, zero_frame_video


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "trip" / "day.1").mkdir(parents=True)
    good = make_clip(seconds=1.5)
    files = {
        "a.mp4": good,
        "b.mov": make_clip(seconds=1.5, container_format="mov"),
        "trip/day.1/c.mkv": make_clip(seconds=1.5, container_format="matroska"),
        "trip/d.webm": make_clip(seconds=1.5, container_format="webm", video_codec="libvpx-vp9", audio_codec="libopus"),
        "e.mp4": good,  # caption from the CSV
        "portrait.mp4": make_clip(seconds=1.5, width=96, height=64, rotation=-90),
        # unusable
        "empty.mp4": b"",
        "cut.mp4": truncated(noisy_clip(seconds=1.5), 0.6),
        "text.mp4": b"not a video at all\n" * 10,
        "zero.mkv": zero_frame_video(),
        "broken.mp4": corrupt_payload(noisy_clip(seconds=1.5)),
        "uncaptioned.mp4": good,
        "notes.md": b"# shoot notes\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "a.txt").write_text("A grey square fades.\n")
    (root / "b.json").write_text(json.dumps({"captions": {"en": "Grey.", "de": "Grau."}, "licence": "cc-by"}))
    (root / "trip" / "day.1" / "c.txt").write_text("Matroska grey.")
    (root / "trip" / "d.json").write_text(json.dumps({"caption": "WebM grey.", "language": "en"}))
    (root / "portrait.txt").write_text("A phone video.")
    for name in ("empty", "cut", "text", "zero", "broken"):
        (root / f"{name}.txt").write_text("caption of a broken file")
    (root / "captions.csv").write_text("file,caption,language\ne.mp4,From the CSV,en\ne.mp4,Aus der CSV,de\n")
    return root


@pytest.fixture(scope="module")
def written(media_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    report = write_shards(str(media_folder), str(out), max_shard_bytes=40_000,
                          captions_csv=str(media_folder / "captions.csv"))
    return out, report


def test_report_lists_every_unusable_file_with_its_reason(written):
    out, report = written
    reasons = {entry["file"]: entry["reason"] for entry in report["skipped_files"]}
    assert reasons == {"empty.mp4": "empty", "cut.mp4": "truncated", "text.mp4": "not_media",
                       "zero.mkv": "zero_frames", "broken.mp4": "undecodable", "uncaptioned.mp4": "no_caption",
                       "notes.md": "not_media"}
    assert report["written"] == 6 and report["skipped"] == 7
    assert report["written"] + report["skipped"] == report["files_seen"] - 10  # minus the 10 caption sidecars
    assert all(entry["what_to_do"] and entry["detail"] for entry in report["skipped_files"])
    assert json.loads((out / "report.json").read_text()) == report


def test_shards_are_bounded_and_hold_media_with_json(written):
    out, report = written
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == len(report["shards"]) >= 2
    assert all(os.path.getsize(path) <= 40_000 for path in shards)
    metas = {}
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    metas[member.name[:-5]] = json.loads(tar.extractfile(member).read())
    by_source = {meta["source"]: meta for meta in metas.values()}
    assert by_source["a.mp4"]["captions"] == {"und": "A grey square fades."}
    assert by_source["b.mov"]["captions"] == {"en": "Grey.", "de": "Grau."} and by_source["b.mov"]["licence"] == "cc-by"
    assert by_source["e.mp4"]["captions"] == {"en": "From the CSV", "de": "Aus der CSV"}
    assert by_source["trip/d.webm"]["captions"] == {"en": "WebM grey."}
    assert by_source["portrait.mp4"]["rotation"] == -90
    assert (by_source["portrait.mp4"]["width"], by_source["portrait.mp4"]["height"]) == (64, 96)
    assert by_source["a.mp4"]["audio_sample_rate"] == 48000 and by_source["a.mp4"]["duration"] == 1.5
    assert "trip_day_1_c" in metas  # no dots or slashes in keys


def test_loader_reads_every_written_container(written):
    out, _ = written
    cfg = loader_config(out, batch_size=1, shuffle_buffer=1, num_workers=0)
    keys = {b["key"][0] for b in take(build_loader(cfg, 0, 1), 6)}
    assert keys == {"a", "b", "trip_day_1_c", "trip_d", "e", "portrait"}


def test_sample_keys_are_unique_and_tar_safe():
    taken = set()
    assert sample_key("x/y.z.mp4", taken) == "x_y_z"
    assert sample_key("x_y.z.mov", taken) == "x_y_z_2"


def test_cli_prints_counts_and_fails_when_nothing_is_usable(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "text.mp4").write_bytes(b"nope")
    assert shards_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "0 written" in captured.out and "not_media: 1" in captured.out and "no usable files" in captured.err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped_files"][0]["file"] == "text.mp4"
