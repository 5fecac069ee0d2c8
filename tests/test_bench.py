"""The performance benchmarks (bench/train_step.py, bench/sample.py) run on the tiny model on CPU
and write their results. No timing is asserted: only that the numbers are there and consistent."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import sample, train_step  # noqa: E402
from model import ModelArgs, SequenceLayout  # noqa: E402
from train.flops import train_flops  # noqa: E402


def test_train_step_bench_runs_the_real_step_on_cpu(tmp_path):
    result = train_step.main(["--preset", "tiny", "--tokens", "300", "1200", "--steps", "2", "--warmup", "12", "--text", "padded", "full",
                              "varied", "--ac", "selective", "--device", "cpu", "--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"train_step_cpu_{result['date']}.json", f"train_step_cpu_{result['date']}.md"]
    saved = json.loads((tmp_path / files[0]).read_text())
    assert saved["command"].startswith("python bench/train_step.py --preset tiny") and saved["versions"]["torch"]
    rows = saved["results"]
    assert [r["steps_timed"] for r in rows] == [2] * 6
    assert all(r["timing"] == "window" and 0 < r["step_s"] for r in rows)
    # padded: the old untrimmed text with its mask; varied: trimmed each step to its caption
    assert [(r["text"], r["key_mask"], r["trim_text"]) for r in rows] == [("padded", True, False), ("full", False, True), ("varied", False, True)] * 2
    assert rows[2]["text_tokens"] == [2, 7, 12, 17, 22, 30, 35, 40, 49, 53, 57, 64]
    assert rows[0]["tokens_per_sample"] == rows[2]["tokens_per_sample"] < rows[3]["tokens_per_sample"] == rows[5]["tokens_per_sample"]
    for r in rows:
        assert r["step_s"] > 0 and r["mfu"] is None  # no H100 peak to divide by on CPU
        assert r["first_step_s"] > 0
        # tokens at the full text length, over the timed window
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_sample"] / r["step_s"], rel=1e-3)
    # FLOPs of the sequence the model ran: the trimmed captions of "varied" (its first two lengths
    # again, 49 and 64 tokens, in the timed steps) against the full segment of "full"
    assert rows[2]["model_flops_per_step"] < rows[1]["model_flops_per_step"]
    # the FLOPs the hook counted during the real step are exactly the layout's training FLOPs
    # (t2v with audio): one forward of a network that trains, counted 3x
    codec = train_step.PatchCodec(**train_step.CODEC)
    args = ModelArgs(**train_step.PRESETS["tiny"], video_channels=48, audio_channels=64, video_patch=(1, 2, 2), audio_patch=1,
                     text_input="bytes", audio_latents_per_video_frame=codec.audio_latents_per_video_frame(train_step.FPS, train_step.SAMPLE_RATE))
    frames, w, h = (int(x) for x in rows[0]["clip"].replace(" frames ", "x").split("x"))
    video = codec.video_latent_shape(frames, h, w)
    audio = codec.audio_latent_shape(round(frames / train_step.FPS * train_step.SAMPLE_RATE))
    layout = SequenceLayout([("text", "condition", (train_step.TEXT_LEN,)), ("video", "generate", video), ("audio", "generate", audio)], args)
    assert layout.n_tokens == rows[0]["tokens_per_sample"]
    assert rows[0]["model_flops_per_step"] == train_flops(layout)


def test_train_step_bench_times_exactly_the_timed_steps_and_profiles_the_next(tmp_path, monkeypatch):
    """The window opens at the start of the first timed step and closes at the start of the step
    after the last (whole loop iterations); the profile covers the one step after the window."""
    events = []  # ("step", batch_idx) per training step, ("now", None) per timer reading, ("start"/"stop", None) of the profiler

    def recording(kind, method, with_index=False):
        def wrapper(self, *args):
            events.append((kind, args[-1] if with_index else None))
            return method(self, *args)
        return wrapper

    monkeypatch.setattr(train_step.PretrainModule, "training_step", recording("step", train_step.PretrainModule.training_step, True))
    monkeypatch.setattr(train_step.StepTimer, "_now", recording("now", train_step.StepTimer._now))
    for name in ("start", "stop"):
        monkeypatch.setattr(torch.profiler.profile, name, recording(name, getattr(torch.profiler.profile, name)))
    (row,) = train_step.main(["--preset", "tiny", "--tokens", "300", "--steps", "3", "--warmup", "2", "--text", "full", "--profile",
                              "--device", "cpu", "--out", str(tmp_path)])["results"]
    marks = [i for i, (kind, _) in enumerate(events) if kind != "step"]
    # step 0 timed alone (two readings), then the window's two readings, then the profiler
    assert [events[i][0] for i in marks] == ["now", "now", "now", "now", "start", "stop"]
    between = [[i for kind, i in events[a:b] if kind == "step"] for a, b in zip(marks, marks[1:])]
    assert between == [[0], [1], [2, 3, 4], [], [5]]
    assert row["steps_timed"] == 3 and row["step_s"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--text", "varied", "--warmup", "11"], "--warmup >= 12"),  # a timed step would see a length the first time
    (["--text", "fresh", "--compile", "--warmup", "1"], "--warmup >= 2"),  # the dynamic-shape compilation would be timed
    (["--text", "fresh", "--warmup", "2", "--steps", "61", "--profile"], "63 caption lengths"),  # a length seen again
    (["--text", "full", "--warmup", "0"], "--warmup and --steps must be >= 1"),  # the compiling first step in the window
])
def test_train_step_bench_refuses_a_case_that_would_time_the_wrong_thing(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_step.main(["--preset", "tiny", "--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_train_step_bench_fresh_gives_every_step_a_new_caption_length(tmp_path, monkeypatch):
    """varied times the lengths its warm-up saw (a long run's steady state); fresh times lengths
    never seen before (a new shape's one-off costs): the batches the step received say which."""
    lengths = []  # text tokens of each step's caption, as the training step received it
    original = train_step.PretrainModule.training_step

    def record(module, batch, batch_idx):
        lengths.append(len(batch["caption"][0].encode()) + 2)
        return original(module, batch, batch_idx)

    monkeypatch.setattr(train_step.PretrainModule, "training_step", record)
    rows = {}
    for text, compiled in (("varied", []), ("fresh", ["--compile"])):
        lengths.clear()
        (rows[text],) = train_step.main(["--preset", "tiny", "--tokens", "300", "--steps", "3", "--warmup", "12", "--device", "cpu",
                                         "--text", text, *compiled, "--out", str(tmp_path)])["results"]
        rows[text]["lengths"] = list(lengths)
    # 12 warm-up steps, 3 timed, and the step whose start closes the timed window
    assert [len(rows[text]["lengths"]) for text in rows] == [16, 16]
    warm, timed = rows["varied"]["lengths"][:12], rows["varied"]["lengths"][12:15]
    assert len(set(warm)) == 12 and set(timed) <= set(warm)
    warm, timed = rows["fresh"]["lengths"][:12], rows["fresh"]["lengths"][12:15]
    assert len(set(warm + timed)) == 15
    assert rows["fresh"]["text_tokens"] == sorted(set(rows["fresh"]["lengths"])) and 2 <= min(warm + timed) and max(warm + timed) <= 64
    assert not rows["fresh"]["key_mask"] and rows["fresh"]["trim_text"]
    # compiled, the warm-up's second length brought the dynamic-shape graph, which takes the timed
    # steps' new lengths without compiling again (static shapes would compile one graph per length)
    assert rows["fresh"]["graphs_compiled_in_timed_steps"] == 0


def test_train_step_bench_profiles_one_step_after_the_timed_ones(tmp_path):
    (row,) = train_step.main(["--preset", "tiny", "--tokens", "300", "--steps", "2", "--warmup", "1", "--device", "cpu",
                              "--text", "full", "--profile", "--out", str(tmp_path)])["results"]
    assert row["steps_timed"] == 2  # the profiled step is not among them
    prof = row["profile"]
    assert prof["clock"] == "CPU" and prof["total_ms"] > 0
    shares = [r["share"] for r in prof["top"]]
    assert 0 < len(shares) <= 30 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-6
    assert any("mm" in r["op"] for r in prof["top"])  # the step's matmuls are in it


def test_train_step_bench_times_float8_cases_on_cpu(tmp_path):
    result = train_step.main(["--preset", "tiny", "--tokens", "300", "--steps", "2", "--warmup", "1", "--device", "cpu",
                              "--text", "full", "--float8", "none", "tensorwise", "--out", str(tmp_path)])
    rows = result["results"]
    assert [(r["float8"], r["float8_layers"]) for r in rows] == [("none", 0), ("tensorwise", 28)]  # (3 + 1 + 3 weight sets) x 4 projections
    assert rows[0]["model_flops_per_step"] == rows[1]["model_flops_per_step"] > 0  # the same model FLOPs, at another rate
    assert "| full: 64, trimmed (no mask) | none | False | tensorwise |" in (tmp_path / f"train_step_cpu_{result['date']}.md").read_text()


def test_sample_bench_extrapolates_layers_on_cpu(tmp_path):
    result = sample.main(["--preset", "tiny", "--clips", "64x64x1", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / f"sample_cpu_{result['date']}.md").is_file()
    (row,) = json.loads((tmp_path / f"sample_cpu_{result['date']}.json").read_text())["results"]
    assert result["extrapolated_from_depths"] == [3, 5]
    # tiny has 1 + 2 + 1 = 4 layers: one forward = fixed + 4 x per layer, from the two depths
    for name in ("student_forward", "uncond_forward"):
        t3, t5 = row[f"{name}_measured_s"]["3"], row[f"{name}_measured_s"]["5"]
        per_layer, fixed, fit = sample.extrapolate({3: t3, 5: t5})
        assert row[f"{name}_s"] == pytest.approx(fixed + 4 * per_layer) and row[f"{name}_fit"] == fit
    assert row["student_8_steps_s"] == pytest.approx(8 * row["student_forward_s"])
    assert row["teacher_cfg_forward_s"] == pytest.approx(row["student_forward_s"] + row["uncond_forward_s"])
    assert row["teacher_50_steps_cfg_s"] == pytest.approx(50 * row["teacher_cfg_forward_s"])
    # text 256 bytes + video 1+6 latent frames of 2x2 tokens + audio 22 latents
    assert row["tokens"] == 256 + 7 * 2 * 2 + 22


def test_sample_extrapolation_keeps_the_fixed_part_non_negative():
    # a fixed part and 0.2 s a layer: the line through both depths, exactly
    per_layer, fixed, fit = sample.extrapolate({3: 0.05 + 0.6, 5: 0.05 + 1.0})
    assert (per_layer, fixed, fit) == (pytest.approx(0.2), pytest.approx(0.05), "line through both depths")
    # lease 4's bf16 1080p forward (H100): the line's fixed part is -35 ms, so at 40 layers it
    # gave 8.005 s; with no fixed part, least squares from both points: 7.714 s
    per_layer, fixed, fit = sample.extrapolate({3: 0.5684, 5: 0.9704})
    assert fixed == 0.0 and fit.startswith("no fixed part") and 40 * per_layer == pytest.approx(7.714, abs=1e-3)


def test_sample_bench_times_each_float8_recipe_on_cpu(tmp_path):
    result = sample.main(["--preset", "tiny", "--clips", "64x64x1", "--repeats", "1", "--device", "cpu", "--float8", "none", "tensorwise",
                          "--out", str(tmp_path), "--tag", "_fp8"])
    rows = result["results"]
    assert [r["float8"] for r in rows] == ["none", "tensorwise"] and all(r["student_forward_s"] > 0 for r in rows)
    assert rows[0]["forward_tflops"] == rows[1]["forward_tflops"]  # the same model FLOPs, at another rate
    assert "| 64x64 1 s | 306 | tensorwise | dense |" in (tmp_path / f"sample_cpu_{result['date']}_fp8.md").read_text()


def test_sample_bench_times_each_video_window_on_cpu(tmp_path):
    result = sample.main(["--preset", "tiny", "--clips", "256x256x3", "--repeats", "1", "--device", "cpu", "--video-window", "none", "1",
                          "--out", str(tmp_path), "--tag", "_window"])
    dense, windowed = result["results"]
    assert (dense["video_window"], windowed["video_window"]) == ("dense", "1xallxall")
    assert dense["attention_tiles_computed"] == 1.0 and windowed["attention_tiles_computed"] < 1.0
    # 1 + 18 latent frames of 8 x 8 tokens (12 tiles in all), +-1 frame: (19 + 2 x 18) / 19^2 of the video pairs
    assert windowed["video_pairs_kept"] == pytest.approx((19 + 2 * 18) / 19**2)
    assert windowed["student_forward_s"] > 0 and windowed["forward_tflops"] < dense["forward_tflops"]  # attention over the window's pairs
    assert "| 1xallxall (" in (tmp_path / f"sample_cpu_{result['date']}_window.md").read_text()


def test_sample_bench_token_counts_of_hh15b():
    """The 5 s 1080p clip of the reference benchmark is 63,240 video tokens (../shared/bench)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "hh15b.yaml"))
    cfg.pop("_target_")
    args = ModelArgs(**cfg)
    segs = sample.segments(args, 1920, 1080, 5)
    assert segs[1].shape == (48, 31, 68, 120)
    layout = SequenceLayout(segs, args)
    assert layout.lengths == (256, 63240, 108)
