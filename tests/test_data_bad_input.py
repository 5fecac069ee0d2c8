"""Every class of bad input, made with real encoders, is skipped and counted under its reason;
the run goes on and the counts reach the main process through the batches."""

import logging
import random

import pytest

from data.buckets import parse_buckets
from data.captions import pick_caption
from data.config import default_buckets
from data.decode import ClipSpec, decode_clip
from data.loader import build_loader
from data.shard_reader import shard_samples
from data.skips import SkipSample
from data.state import StreamState
from data_fixtures import (caption_json, corrupt_payload, loader_config, make_clip, noisy_clip, take, truncated,
                           write_shard, zero_frame_video)


@pytest.fixture(scope="module")
def media():
    good = make_clip(seconds=1.0)
    noisy = noisy_clip(seconds=1.0)
    return {
        "good": good,
        "empty": b"",
        "truncated": truncated(noisy, 0.6),  # faststart MP4 cut short: opens, data ends early
        "truncated_index": truncated(make_clip(seconds=1.0, faststart=False), 0.6),  # cut before its index
        "not_media": b"this is a text file that someone named clip.mp4\n" * 20,
        "zero_frames": zero_frame_video(),
        "undecodable": corrupt_payload(noisy),
        "too_short": make_clip(seconds=0.5),
        "no_audio": make_clip(audio=False),
    }


EXPECTED_REASON = {"empty": "empty", "truncated": "truncated", "truncated_index": "truncated",
                   "not_media": "not_media", "zero_frames": "zero_frames", "undecodable": "undecodable",
                   "too_short": "too_short"}


@pytest.mark.parametrize("name", sorted(EXPECTED_REASON))
def test_each_bad_file_has_its_reason(media, name):
    spec = ClipSpec(1.0, 24, 16000, 1, parse_buckets(default_buckets(64)))
    with pytest.raises(SkipSample) as skip:
        decode_clip(media[name], spec, random.Random(0))
    assert skip.value.reason == EXPECTED_REASON[name], skip.value


def _bad_shard(path, media, worker_tag: str):
    """Every bad kind, plus sample-level faults, then one good sample last so that reaching it
    means every bad one before it was seen."""
    samples = [(f"{worker_tag}_{name}", {"mkv" if name == "zero_frames" else "mp4": media[name], "json": caption_json()})
               for name in EXPECTED_REASON]
    samples += [
        (f"{worker_tag}_no_caption", {"mp4": media["good"]}),
        (f"{worker_tag}_bad_json", {"mp4": media["good"], "json": b"{not json"}),
        (f"{worker_tag}_no_media", {"json": caption_json()}),
        (f"{worker_tag}_no_audio", {"mp4": media["no_audio"], "json": caption_json()}),
        (f"{worker_tag}_good", {"mp4": media["good"], "json": caption_json()}),
    ]
    return write_shard(path, samples)


def test_bad_samples_are_skipped_and_counted_across_workers(tmp_path, media):
    _bad_shard(tmp_path / "a.tar", media, "a")
    _bad_shard(tmp_path / "b.tar", media, "b")
    cfg = loader_config(tmp_path, batch_size=1, shuffle_buffer=1, num_workers=2, missing_audio="silence")
    state = StreamState()
    keys = []
    for batch in build_loader(cfg, 0, 1):
        state.update(batch)
        keys += batch["key"]
        if len(keys) == 4:  # no_audio + good from each shard
            break
    assert sorted(keys) == ["a_good", "a_no_audio", "b_good", "b_no_audio"]
    expected = {reason: 2 * list(EXPECTED_REASON.values()).count(reason) for reason in set(EXPECTED_REASON.values())}
    expected.update(no_caption=2, bad_json=2, no_media_member=2)
    assert state.skip_counts() == expected


def test_skips_are_logged_with_file_sample_and_advice(tmp_path, media, caplog):
    write_shard(tmp_path / "only.tar", [("broken", {"mp4": media["not_media"], "json": caption_json()}),
                                        ("fine", {"mp4": media["good"], "json": caption_json()})])
    cfg = loader_config(tmp_path, batch_size=1, shuffle_buffer=1, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        batch = next(iter(build_loader(cfg, 0, 1)))
    assert batch["key"] == ["fine"] and batch["stream"]["skips"] == {"not_media": 1}
    message = next(r.getMessage() for r in caplog.records if "broken" in r.getMessage())
    assert "only.tar:broken" in message and "not_media" in message and "check the file type" in message


def test_missing_audio_skip_switch(tmp_path, media):
    write_shard(tmp_path / "s.tar", [("silent", {"mp4": media["no_audio"], "json": caption_json()}),
                                     ("fine", {"mp4": media["good"], "json": caption_json()})])
    kept = next(iter(build_loader(loader_config(tmp_path, batch_size=2, shuffle_buffer=1, missing_audio="silence"))))
    silent = kept["key"].index("silent")
    assert not kept["audio_mask"][silent].any() and not kept["audio"][silent].any()
    assert kept["audio_mask"][1 - silent].all()
    skipped = next(iter(build_loader(loader_config(tmp_path, batch_size=1, shuffle_buffer=1, missing_audio="skip"))))
    assert skipped["key"] == ["fine"] and skipped["stream"]["skips"] == {"no_audio": 1}


def test_truncated_tar_shard_is_counted_and_its_complete_samples_kept(tmp_path, media):
    path = write_shard(tmp_path / "cut.tar", [(f"s{i}", {"mp4": media["good"], "json": caption_json()}) for i in range(3)])
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: int(len(data) * 0.6)])  # ends inside s2's video
    samples = list(shard_samples(path))
    assert [s["__key__"] for s in samples[:3]] == ["s0", "s1", "s2"]
    assert samples[3]["__skip__"].reason == "bad_shard" and "cut.tar" in samples[3]["__skip__"].detail
    batches = take(build_loader(loader_config(tmp_path, batch_size=1, shuffle_buffer=1)), 3)
    assert [b["key"][0] for b in batches] == ["s0", "s1", "s0"]  # second epoch starts again
    assert batches[2]["stream"]["skips"] == {"truncated": 1, "bad_shard": 1}


def test_a_stream_of_only_bad_samples_stops_with_a_clear_error(tmp_path, media):
    write_shard(tmp_path / "bad.tar", [(f"s{i}", {"mp4": media["too_short"], "json": caption_json()}) for i in range(3)])
    loader = build_loader(loader_config(tmp_path, batch_size=1, max_consecutive_skips=20))
    with pytest.raises(RuntimeError, match="skipped 20 samples in a row.*too_short"):
        next(iter(loader))


def test_an_unexpected_error_is_counted_as_decode_error_and_the_run_goes_on(tmp_path, media, monkeypatch, caplog):
    import data.sample

    real_decode = data.sample.decode_clip
    calls = []

    def flaky(data, spec, rng):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug or an FFmpeg surprise")
        return real_decode(data, spec, rng)

    monkeypatch.setattr(data.sample, "decode_clip", flaky)
    write_shard(tmp_path / "s.tar", [(f"s{i}", {"mp4": media["good"], "json": caption_json()}) for i in range(2)])
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        batch = next(iter(build_loader(loader_config(tmp_path, batch_size=1, shuffle_buffer=1))))
    assert batch["key"] == ["s1"] and batch["stream"]["skips"] == {"decode_error": 1}
    record = next(r for r in caplog.records if "decode_error" in r.getMessage())
    assert "s.tar:s0" in record.getMessage() and record.exc_info is not None  # traceback kept for bugs


def test_captions_that_are_not_text_are_dropped_not_printed():
    assert pick_caption({"captions": {"en": None, "de": " Hallo "}}, random.Random(0)) == ("de", "Hallo")
    for meta in ({"captions": {"en": None}}, {"captions": {"en": ["a", "b"], "fr": ""}}, {"caption": None}):
        with pytest.raises(SkipSample) as skip:
            pick_caption(meta, random.Random(0))
        assert skip.value.reason == "no_caption"
