"""The measures of the distillation quality report (bench/av_quality.py) on real synthetic clips,
whose event times, colours and motions are known, and the report script end to end on tiny
random-weight teacher/student exports."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import av_quality as q  # noqa: E402
import distill_quality  # noqa: E402
from data.batching import stack_video  # noqa: E402
from data.config import LoaderConfig, SyntheticConfig  # noqa: E402
from data.decode import ClipSpec, decode_clip  # noqa: E402
from data.synthetic import synthetic_clip  # noqa: E402
from model import AVTransformer  # noqa: E402
from tests.test_pretrain_module import tiny_args  # noqa: E402
from train.checkpoint import describe, export_safetensors  # noqa: E402
from train.codec import PatchCodec  # noqa: E402

FPS, SR = 12, 8000


@pytest.fixture(scope="module")
def real_clips():
    syn = SyntheticConfig(num_clips=12, seconds=2.0, fps=24, width=64, height=64, sample_rate=16000, seed=123, languages=["en"])
    spec = ClipSpec.from_config(LoaderConfig(shards="x", clip_seconds=2.0, fps=FPS, sample_rate=SR, buckets=[["1:1", 32, 32]]))
    clips = []
    for i in range(syn.num_clips):
        mp4, meta = synthetic_clip(syn, i)
        clip = decode_clip(mp4, spec, random.Random(0))
        assert clip.start == 0.0  # whole clip: event times are the meta's
        clips.append((stack_video([clip.video], as_uint8=False)[0], torch.from_numpy(clip.audio), meta))
    return clips


def test_sound_onsets_are_the_events(real_clips):
    for _, audio, meta in real_clips:
        truth = [e["time"] for e in meta["events"]]
        onsets = q.sound_onsets(audio, SR)
        assert len(onsets) == len(truth)
        assert max(abs(a - b) for a, b in zip(onsets, truth)) <= 0.012  # a few ms, through AAC


def test_motion_events_and_sync_on_real_clips(real_clips):
    tolerance = 1 / FPS + 0.01
    matched, offsets = [], []
    for video, audio, meta in real_clips:
        truth = [e["time"] for e in meta["events"]]
        events = q.motion_events(video, FPS)
        matched.append(q.sync_error(truth, events, tolerance)["onsets_matched"])
        s = q.sync_error(q.sound_onsets(audio, SR), events, tolerance)
        offsets.append(s["mean_abs_offset_ms"])
    assert sum(matched) / len(matched) >= 0.85, matched  # most true events are detected in the picture
    assert sorted(offsets)[len(offsets) // 2] <= 1000 / FPS, offsets  # median offset within a frame


def test_colour_and_axis_follow_the_truth(real_clips):
    colour = [q.dominant_colour(v) in {s["colour"] for s in m["shapes"]} for v, _, m in real_clips]
    axis = [q.motion_axis(v) == m["motion"] for v, _, m in real_clips if m["motion"] in ("horizontal", "vertical")]
    assert all(colour) and axis and all(axis)


def test_a_black_clip_has_no_colour_and_no_events():
    video = torch.full((3, 8, 16, 16), q.BG)
    assert q.dominant_colour(video) is None and q.motion_events(video, FPS) == []
    assert q.sound_onsets(torch.zeros(1, SR), SR) == []
    assert q.sync_error([], [], 0.1) == {"onsets": 0, "events": 0, "mean_abs_offset_ms": None, "onsets_matched": 0.0, "events_matched": 0.0}


def test_frechet_distance_against_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 2, generator=g) * torch.tensor([1.0, 2.0])
    b = torch.randn(20000, 2, generator=g) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -1.0])
    # diagonal covariances: |mu|^2 + sum (s_a - s_b)^2 = 2 + (2^2 + 1.5^2)
    assert q.frechet_distance(a, b) == pytest.approx(2 + 4 + 2.25, rel=0.03)
    assert q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_quality_report_runs_on_tiny_exports(tmp_path):
    codec = PatchCodec(video_pool=True)
    args = tiny_args(codec, 32)
    torch.manual_seed(0)
    model = AVTransformer(args)
    with torch.no_grad():  # outputs that depend on the blocks (the heads start at zero)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = describe(model.args, codec, FPS, SR, 1, 32, (256, 1.0, 3.0))
    teacher = export_safetensors(tmp_path / "teacher.safetensors", model.state_dict(), meta, 10, "raw")
    student = export_safetensors(tmp_path / "student.safetensors", model.state_dict(), {**meta, "student": {"steps": 4, "timesteps": None}}, 5, "raw")
    out = tmp_path / "report.json"
    distill_quality.main(["--teacher", str(teacher), "--student", str(student), "--clips", "4", "--seconds", "1.0",
                          "--height", "16", "--width", "16", "--teacher-steps", "3", "--device", "cpu", "--out", str(out),
                          "--float8", "tensorwise", "--video-window", "1"])
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) == {"real", "teacher", "student", "student_float8", "student_window_1xallxall"}
    windowed = rows["student_window_1xallxall"]  # the same student with +-1 latent frame of video attention
    assert windowed["video_window"] == "1xallxall" and 0 < windowed["video_pairs_kept"] < 1
    assert 0 < windowed["video_relative_difference_to_student"] and windowed["network_evaluations"] == 4
    fp8 = rows["student_float8"]  # the same student, prompts and seeds, FP8 block matmuls: close, not equal
    assert fp8["float8"] == "tensorwise" and fp8["network_evaluations"] == 4
    assert 0 < fp8["video_relative_difference_to_student"] < 0.2 and 0 < fp8["audio_relative_difference_to_student"] < 0.2
    assert rows["teacher"]["network_evaluations"] == 6 and rows["student"]["network_evaluations"] == 4
    assert rows["student"]["sampler"] == "student" and rows["teacher"]["sampler"] == "euler"
    assert rows["real"]["colour_acc"] == 1.0
    for row in rows.values():
        assert row["fd"] >= 0 and 0 <= row["sync_onsets_matched"] <= 1
    # an untrained model's clips are far from the real ones
    assert rows["student"]["fd"] > rows["real"]["fd"]
