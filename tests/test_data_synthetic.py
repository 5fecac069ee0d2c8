"""Synthetic dataset -> shards -> loader round trip: frame counts, audio lengths, and sound
onsets against the recorded event times (AAC priming must be compensated)."""

import io
import json
import tarfile

import av
import numpy as np
import pytest

from data.config import SyntheticConfig
from data.loader import build_loader
from data.synthetic import main as synthetic_main
from data.synthetic import synthetic_clip
from data.synthetic_captions import LANGUAGES
from data_fixtures import loader_config, onsets, synthetic_shards, take


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    cfg, paths = synthetic_shards(out)
    return cfg, paths, out


def decoded(mp4: bytes) -> bytes:
    """An mp4's decoded frames and samples. libx264 now and then writes a keyframe of the same
    picture one byte longer, so the same clip is not always the same bytes."""
    with av.open(io.BytesIO(mp4)) as container:
        return b"".join(frame.to_ndarray().tobytes() for frame in container.decode(video=0, audio=0))


def test_same_seed_same_clip_other_seed_other_clip():
    cfg = SyntheticConfig(num_clips=1, seconds=1.0, width=64, height=64, seed=5)
    media, meta = synthetic_clip(cfg, 0)
    again, meta_again = synthetic_clip(cfg, 0)
    other, other_meta = synthetic_clip(SyntheticConfig(num_clips=1, seconds=1.0, width=64, height=64, seed=6), 0)
    assert decoded(media) == decoded(again) and meta == meta_again
    assert decoded(media) != decoded(other)


def test_sample_json_describes_clip_and_events(synthetic_dir):
    cfg, paths, _ = synthetic_dir
    with tarfile.open(paths[0]) as tar:
        names = sorted(tar.getnames())
        assert names == ["synthetic_000000.json", "synthetic_000000.mp4", "synthetic_000001.json", "synthetic_000001.mp4"]
        meta = json.loads(tar.extractfile("synthetic_000000.json").read())
        media = tar.extractfile("synthetic_000000.mp4").read()
    assert meta["source"] == "synthetic"
    assert set(meta["captions"]) == set(LANGUAGES) == set(meta["languages"])
    assert all(len(text) > 20 for text in meta["captions"].values())
    assert (meta["fps"], meta["width"], meta["height"], meta["duration"]) == (24, 64, 64, 1.5)
    assert (meta["audio_sample_rate"], meta["audio_channels"]) == (48000, 1)
    assert meta["motion"] and meta["sound"] and meta["shapes"][0]["shape"] and meta["shapes"][0]["colour"]
    assert meta["events"], "every clip has at least one event"
    for event in meta["events"]:
        assert event["time"] == event["frame"] / 24 and 0 < event["time"] < 1.5
        assert event["sample"] == round(event["time"] * 48000)
    with av.open(io.BytesIO(media)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, audio.codec_context.name, container.format.name.split(",")[0]) == ("h264", "aac", "mov")
        assert video.frames == 36


def test_shards_hold_clips_per_shard(synthetic_dir):
    cfg, paths, _ = synthetic_dir
    assert len(paths) == cfg.num_clips // cfg.clips_per_shard
    for path in paths:
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) == 2 * cfg.clips_per_shard


@pytest.mark.parametrize("sample_rate", [16000, 44100])
def test_round_trip_lengths_and_sound_onsets(synthetic_dir, sample_rate):
    cfg, _, out = synthetic_dir
    loader = build_loader(loader_config(out, sample_rate=sample_rate, batch_size=4, shuffle_buffer=1), 0, 1)
    checked_events, worst = 0, 0.0
    for batch in take(loader, cfg.num_clips // 4):
        assert batch["video"].shape == (4, 3, 24, 80, 80)  # 1 s at 24 fps, 1:1 bucket at resolution 64
        assert batch["video"].dtype.is_floating_point and -1 <= batch["video"].min() < batch["video"].max() <= 1
        assert batch["audio"].shape == (4, 1, sample_rate)  # exactly clip_seconds * sample_rate
        assert batch["audio_mask"].all()
        for audio, start, meta in zip(batch["audio"], batch["clip_start"], batch["meta"]):
            window = [e["time"] - start for e in meta["events"]]
            inside = [t for t in window if 0.02 <= t <= 0.98]
            found = onsets(audio[0].numpy(), sample_rate)
            for t in inside:  # every event is heard within one video frame
                error = np.min(np.abs(found - t))
                assert error <= 1 / 24, (meta["clip_index"], t, found)
                worst = max(worst, error)
            for t in found[found > 0.16]:  # and every sound belongs to an event (sounds last 0.15 s)
                assert min(abs(np.asarray(window) - t)) <= 1 / 24, (meta["clip_index"], t, window)
            checked_events += len(inside)
    assert checked_events >= cfg.num_clips
    # Much tighter than a frame: uncompensated AAC priming (1024 samples = 21 ms at 48 kHz) or
    # a window cut off by one source frame would show here.
    assert worst < 0.002


def test_video_frames_follow_the_clip_window(synthetic_dir):
    """The decoded window starts on a source frame: frame k of the batch is source frame
    clip_start * fps + k (compare with a direct decode)."""
    cfg, paths, out = synthetic_dir
    batch = take(build_loader(loader_config(out, batch_size=1, shuffle_buffer=1), 0, 1), 1)[0]
    key, start = batch["key"][0], batch["clip_start"][0]
    with tarfile.open(paths[batch["meta"][0]["clip_index"] // cfg.clips_per_shard]) as tar:
        media = tar.extractfile(f"{key}.mp4").read()
    with av.open(io.BytesIO(media)) as container:
        source = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    first = round(start * 24)
    assert abs(start * 24 - first) < 1e-6
    decoded = ((batch["video"][0].permute(1, 2, 3, 0).numpy() + 1) * 127.5)  # T, H, W, 3
    for k in (0, 11, 23):
        expected = source[first + k].astype(np.float32).mean(axis=(0, 1))
        assert np.allclose(decoded[k].mean(axis=(0, 1)), expected, atol=3), k


def test_cli_writes_shards(tmp_path, capsys):
    assert synthetic_main(["--out", str(tmp_path), "--num-clips", "3", "--clips-per-shard", "2", "--seconds", "1",
                           "--width", "64", "--height", "64", "--languages", "en,de"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic.json"]
    with tarfile.open(tmp_path / "synthetic-000001.tar") as tar:
        meta = json.loads(tar.extractfile("synthetic_000002.json").read())
    assert meta["languages"] == ["en", "de"] and set(meta["captions"]) == {"en", "de"}
    assert "wrote 3 clips" in capsys.readouterr().out


def shard_clips(shard) -> list:
    """A shard's members as what they hold: the json as written, each mp4 decoded."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return [(name, decoded(data) if name.endswith(".mp4") else data) for name, data in members]


def test_prepare_synthetic_completes_a_set_cut_short_and_leaves_others_alone(tmp_path, capsys):
    import dataclasses
    import shutil
    import threading
    from types import SimpleNamespace

    from data.synthetic import write_synthetic_shards
    from train.datamodule import prepare_synthetic

    cfg = SyntheticConfig(num_clips=4, seconds=0.5, width=32, height=32, sample_rate=8000, clips_per_shard=2)
    out = tmp_path / "set"
    prepare_synthetic(cfg, SimpleNamespace(shards=str(out)))
    first, second = sorted(out.glob("*.tar"))
    whole = [shard_clips(first), shard_clips(second)]
    kept = first.stat().st_mtime_ns
    second.unlink()  # a run stopped while writing
    prepare_synthetic(cfg, SimpleNamespace(shards=str(out)))
    assert [shard_clips(first), shard_clips(second)] == whole and first.stat().st_mtime_ns == kept
    assert "1 of 2 shards" in capsys.readouterr().out

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(first, other / "mine-000000.tar")
    prepare_synthetic(cfg, SimpleNamespace(shards=str(other)))
    assert sorted(p.name for p in other.iterdir()) == ["mine-000000.tar"]
    assert "training on them as they are" in capsys.readouterr().out

    # A set of the same names from other options (here fewer clips: its one shard is the first
    # name of this config's two) is not mixed with this config's clips.
    smaller = tmp_path / "smaller"
    write_synthetic_shards(dataclasses.replace(cfg, num_clips=2), str(smaller))
    prepare_synthetic(cfg, SimpleNamespace(shards=str(smaller)))
    assert sorted(p.name for p in smaller.glob("*.tar")) == [first.name]
    assert "training on them as they are" in capsys.readouterr().out

    # Ranks that write the same set at once (each calls prepare_synthetic) do not collide.
    both = tmp_path / "both"
    errors = []
    def write():
        try:
            write_synthetic_shards(cfg, str(both))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [shard_clips(p) for p in sorted(both.glob("*.tar"))] == whole
    assert sorted(p.name for p in both.iterdir()) == [first.name, second.name, "synthetic.json"]  # no temporary files left
