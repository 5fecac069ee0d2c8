"""The pretraining LightningModule on a fixed in-memory batch: the loss goes down, EMA and the LR
schedule behave, export round-trips."""

import copy
import dataclasses

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from model import AVTransformer, ModelArgs
from train.checkpoint import describe, export_safetensors, load_generator
from train.codec import PatchCodec
from train.config import ConfigError, FlowConfig, OptimConfig, RunConfig
from train.ema import EMA
from train.pretrain import PretrainModule, adamw, audio_latent_mask, lr_factor, step_generator

FPS, SR = 12, 8000


def fixed_batch(batch=2, frames=6, size=16, seconds=0.5):
    g = torch.Generator().manual_seed(0)
    samples = int(seconds * SR)
    t = torch.linspace(0, 1, frames)
    # smooth, learnable content: a moving gradient and a sine tone
    xs = torch.linspace(-1, 1, size)
    video = torch.stack([torch.sin(3 * xs[None, :, None] + 2 * t[:, None, None] + xs[None, None, :]) for _ in range(3)])
    video = video[None].repeat(batch, 1, 1, 1, 1) * 0.8
    audio = 0.3 * torch.sin(torch.arange(samples) / SR * 2 * torch.pi * 440)[None, None].repeat(batch, 1, 1)
    mask = torch.ones(batch, samples, dtype=torch.bool)
    mask[1, samples // 2 :] = False  # second clip's audio ends early
    return {"video": video + 0.01 * torch.randn(video.shape, generator=g), "audio": audio, "audio_mask": mask, "caption": ["a tone", "a wave"]}


class Repeat(Dataset):
    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


def tiny_args(codec: PatchCodec, dim: int) -> ModelArgs:
    """A 1 + 1 + 1-layer model of width `dim` on the codec's latents at FPS and SR."""
    return ModelArgs(dim=dim, n_heads=4, n_kv_heads=2, mlp_hidden=2 * dim, n_modality_in=1, n_shared=1, n_modality_out=1,
                     video_channels=codec.video_latent_channels, audio_channels=codec.audio_latent_channels,
                     text_input="bytes", text_feature_dim=0, audio_latents_per_video_frame=codec.audio_latents_per_video_frame(FPS, SR))


def make_module(lr=3e-3, ema_decay=0.9, trim_text=True, ema_every=1, **flow):
    codec = PatchCodec()
    args = tiny_args(codec, 48)
    torch.manual_seed(0)
    model = AVTransformer(args)
    flow_cfg = FlowConfig(caption_dropout=0.0, text_len=16, **flow)
    meta = describe(model.args, codec, FPS, SR, 1, flow_cfg.text_len, flow_cfg.shift_args)
    return PretrainModule(model, codec, flow_cfg, OptimConfig(lr=lr, warmup_steps=5, schedule="constant"), RunConfig(run_dir="unused", ema_decay=ema_decay, ema_every_n_steps=ema_every, trim_text=trim_text), meta)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(module, steps, callbacks=(), **trainer_kwargs):
    rec = LossRecorder()
    loader = DataLoader(Repeat(fixed_batch(), steps), batch_size=None)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[rec, *callbacks], **trainer_kwargs)
    trainer.fit(module, loader)
    return rec.losses, trainer


def eval_losses(module):
    """Per-modality loss with the noise and timesteps of step 0, whatever step training is at."""
    trainer, module._trainer = module._trainer, None
    losses, _ = fit_one(module, fixed_batch())
    module._trainer = trainer
    return losses


def test_loss_goes_down_on_a_fixed_batch():
    module = make_module()
    before = eval_losses(module)
    losses, _ = fit(module, 200)
    after = eval_losses(module)
    for modality in ("video", "audio"):
        assert after[modality] < 0.8 * before[modality], f"{modality}: {before[modality]:.3f} -> {after[modality]:.3f}"
    assert sum(losses[-20:]) < sum(losses[:20])


def test_ema_tracks_the_weights_and_is_used_for_export(tmp_path):
    module = make_module(ema_decay=0.5)
    fit(module, 6)
    # with decay 0.5 and several updates the EMA is close to, but not equal to, the weights
    w = dict(module.model.named_parameters())["blocks.1.weights.shared.qkv.weight"]
    s = module.ema.named_weights()["blocks.1.weights.shared.qkv.weight"]
    assert not torch.equal(w.detach(), s) and (w.detach() - s).abs().max() < (w.detach()).abs().max()
    path = export_safetensors(tmp_path / "m.safetensors", module.ema.named_weights(), module.meta, 6, "ema")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # written through a .partial file, renamed
    model, codec, meta, step = load_generator(path)
    assert step == 6 and meta["text_len"] == 16 and codec.config() == module.codec.config()
    torch.testing.assert_close(dict(model.named_parameters())["blocks.1.weights.shared.qkv.weight"], s)
    # `train sample` on a GPU: built in bf16, the weights rounded from the file's
    half, *_ = load_generator(path, dtype=torch.bfloat16)
    full, half = dict(model.named_parameters()), dict(half.named_parameters())
    assert half.keys() == full.keys() and all(p.dtype == torch.bfloat16 for p in half.values())
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)


def test_lazy_export_reads_what_the_eager_one_does(tmp_path):
    """read_weights(lazy=True): names and shapes up front, tensors read when used (the ZeRO-3
    distill build reads the teacher this way), and a model that does not fit is named."""
    from train.checkpoint import SafetensorsWeights, check_fits, load_into, read_weights

    module = make_module()
    path = export_safetensors(tmp_path / "m.safetensors", dict(module.model.named_parameters()), module.meta, 0, "raw")
    eager, meta, _ = read_weights(path)
    lazy, lazy_meta, _ = read_weights(path, lazy=True)
    assert isinstance(lazy, SafetensorsWeights) and meta == lazy_meta and sorted(lazy) == sorted(eager)
    assert all(lazy.shape(k) == tuple(v.shape) and torch.equal(lazy[k], v) for k, v in eager.items())
    fresh = AVTransformer(module.model.args)
    load_into(fresh, lazy, "test")
    assert all(torch.equal(p, eager[n]) for n, p in fresh.named_parameters())
    with torch.device("meta"):
        wider = AVTransformer(dataclasses.replace(module.model.args, mlp_hidden=module.model.args.mlp_hidden * 2))
    with pytest.raises(ConfigError, match=r"test: weights do not fit the model config: .*shape mismatches, e\.g\. \['blocks"):
        check_fits(wider, lazy, "test")


def test_ema_update_rule():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, 0.9)
    ema.updates = ema.folded = 100  # past the warm-up: the decay is 0.9
    before = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.named_weights()["weight"], before + 0.1)
    with ema.swapped_in():
        torch.testing.assert_close(lin.weight, before + 0.1)
    torch.testing.assert_close(lin.weight, before + 1.0)
    # warm-up: the first update uses decay 1/10, so the EMA mostly follows the weights
    fresh = EMA(lin, 0.999)
    assert fresh.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        lin.weight.add_(1.0)
    fresh.update()
    torch.testing.assert_close(fresh.named_weights()["weight"], lin.weight.detach() - 0.1)


def ema_run(every: int, steps: int, hold: int = 1, resume_at: int | None = None) -> list[torch.Tensor]:
    """The EMA's shadow after each of `steps` optimizer steps of a linear layer whose weights move
    every `hold` steps; with resume_at, through a state_dict saved and loaded into a fresh EMA."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    ema, shadows = EMA(lin, 0.9, every), []
    for step in range(1, steps + 1):
        if (step - 1) % hold == 0:
            with torch.no_grad():
                lin.weight.add_(torch.full_like(lin.weight, float(step)))
        ema.update()
        if step == resume_at:
            state = copy.deepcopy(ema.state_dict())  # as a checkpoint holds it: nothing shared with the old EMA
            ema = EMA(lin, 0.9, every)
            ema.load_state_dict(state)
        shadows.append(ema.named_weights()["weight"].clone())
    return shadows


def test_ema_every_n_steps_folds_n_steps_of_held_weights_exactly():
    every_step, every_4 = ema_run(1, 16, hold=4), ema_run(4, 16, hold=4)
    # weights held for 4 steps: folding them in once with the 4 steps' decay (warm-up included)
    # is the per-step EMA, at every fold
    for step in (4, 8, 12, 16):
        torch.testing.assert_close(every_4[step - 1], every_step[step - 1])
    # between folds the shadow stays as it was
    assert all(torch.equal(every_4[s], every_4[3]) for s in (4, 5, 6))
    assert not torch.equal(every_4[7], every_4[3])
    # weights that move every step: close to, not equal to, the per-step EMA
    moving_1, moving_4 = ema_run(1, 40), ema_run(4, 40)
    assert not torch.equal(moving_4[-1], moving_1[-1])
    assert (moving_4[-1] - moving_1[-1]).abs().max() < 0.25 * (moving_1[-1] - ema_run(1, 1)[0]).abs().max()


def test_ema_resumes_between_folds_as_the_uninterrupted_run():
    whole = ema_run(4, 14)
    resumed = ema_run(4, 14, resume_at=6)  # two steps past a fold
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))
    with pytest.raises(ConfigError, match="ema_every_n_steps=0: must be >= 1"):
        RunConfig(run_dir="unused", ema_every_n_steps=0)


def test_lr_schedule_warmup_then_cosine():
    opt = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, opt, 110) == pytest.approx(0.1)
    assert lr_factor(9, opt, 110) == pytest.approx(1.0)
    assert lr_factor(60, opt, 110) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_factor(110, opt, 110) == pytest.approx(0.1)
    assert lr_factor(500, OptimConfig(warmup_steps=10, schedule="constant"), 110) == 1.0


def test_weight_decay_reaches_matrices_and_not_modulation_gains_or_biases():
    model = make_module().model
    opt = adamw(model.named_parameters(), OptimConfig(weight_decay=0.1), fused=False)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    by_name = {name: decays[id(p)] for name, p in model.named_parameters()}
    assert len(by_name) == len(decays)  # every trainable parameter is in exactly one group
    offsets = [n for n in by_name if n.endswith(".modulation")]
    projections = [n for n in by_name if n.endswith("to_modulation.weight")]
    assert offsets and projections
    assert all(by_name[n] == 0.0 for n in offsets + projections)  # the adaLN modulation, offsets and projections
    assert all(by_name[n] == 0.0 for n, p in model.named_parameters() if p.ndim < 2)
    assert all(by_name[n] == 0.1 for n, p in model.named_parameters() if p.ndim >= 2 and "modulation" not in n)


def test_step_generators_give_every_rank_and_the_shared_draws_their_own_stream():
    def draws(seed, step, rank):
        return torch.rand(4, generator=step_generator(seed, step, rank))

    shared = draws(0, 5, None)  # the task and the exit step: the same on every rank
    assert torch.equal(shared, draws(0, 5, None))
    ranks = [draws(0, 5, r) for r in range(3)]
    assert not any(torch.equal(shared, r) for r in ranks)  # rank 0's caption dropout is not the task's draw
    assert not torch.equal(ranks[0], ranks[1]) and not torch.equal(ranks[0], draws(0, 6, 0)) and not torch.equal(ranks[0], draws(1, 5, 0))
    assert torch.equal(draws(-1, 5, 0), draws(-1, 5, 0))  # any integer seed
    noise = torch.rand(4, generator=step_generator(0, 5, 0, "cpu", stream=1))  # the device's stream, on a CPU run
    assert not torch.equal(noise, ranks[0])


def test_audio_mask_to_latent_frames():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert audio_latent_mask(mask, 2).tolist() == [[True, True, False]]


def test_missing_audio_gets_no_audio_loss():
    module = make_module()
    batch = fixed_batch()
    batch["audio_mask"][:] = False
    losses, _ = fit_one(module, batch)
    assert losses["audio"] == 0.0


def fit_one(module, batch):
    logged = {}
    log = module.log
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    module.training_step(batch, 0)
    module.log = log
    return {k.removeprefix("train/loss_"): v for k, v in logged.items() if k.startswith("train/loss_")}, logged


def test_resuming_a_run_that_padded_captions_on_the_right_asks_to_keep_it():
    """Checkpoints from before ModelArgs.text_padding have none in their description: such a run
    padded on the right, and resuming it with left padding would move every caption's tokens."""
    from train.config import ConfigError

    module = make_module()
    old = {k: v for k, v in module.meta["model"].items() if k != "text_padding"}
    with pytest.raises(ConfigError, match=r"right-padded captions but model.text_padding='left'; resume it with model.text_padding=right"):
        module.on_load_checkpoint({"avgen": {**module.meta, "model": old}})
    module.on_load_checkpoint({"avgen": module.meta})  # the same padding: resumes
    right = PretrainModule(dataclasses.replace(module.model_args, text_padding="right"), module.codec, module.flow, module.optim, module.run, module.meta)
    right.on_load_checkpoint({"avgen": {**module.meta, "model": old}})


@pytest.mark.parametrize("task", [{}, {"i2v_rate": 1.0}, {"no_audio_rate": 1.0}], ids=["t2v", "i2v", "no_audio"])
def test_trimmed_captions_train_on_the_same_predictions_without_a_mask(task):
    """RunConfig.trim_text cuts the text segment to the batch's longest caption: with left
    padding the model predicts what it predicts on the padded, masked sequence (so the loss is
    the same), and a batch of one runs with no key mask (cuDNN attention's fast path). The
    timesteps keep the untrimmed length's shift. Random weights: an initialised model predicts
    zero (adaLN-Zero), whatever the text."""
    full = fixed_batch()
    batches = {"one clip": {**{k: v[:1] for k, v in full.items() if k != "caption"}, "caption": ["a tone"]},
               "two lengths": {**full, "caption": ["a tone", "a low hum"]}}

    def step(batch, trim):
        module = make_module(trim_text=trim, **task)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        seen = {}
        module.model.register_forward_hook(lambda m, args, out: seen.update(mask=args[3], preds=[o for o in out if o is not None]))
        losses, logged = fit_one(module, batch)
        return seen, losses, logged["train/shift"]

    for name, batch in batches.items():
        (padded, padded_loss, padded_shift), (trimmed, trimmed_loss, trimmed_shift) = step(batch, False), step(batch, True)
        assert len(trimmed["preds"]) == (1 if task.get("no_audio_rate") else 2)
        for want, got in zip(padded["preds"], trimmed["preds"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert trimmed_loss == pytest.approx(padded_loss, rel=1e-5)
        assert trimmed_shift == padded_shift and padded["mask"] is not None
        assert (trimmed["mask"] is None) == (name == "one clip"), name
    # the text reaches the predictions: another caption moves them far more than the tolerance
    other, _, _ = step({**batches["one clip"], "caption": ["zzzzzzzzzz"]}, True)
    one, _, _ = step(batches["one clip"], True)
    assert (other["preds"][0] - one["preds"][0]).abs().max() > 1e-2


class NormBeforeAndAfterClip(L.Callback):
    """The gradient norm before the clip (callbacks' hook runs before the module's and before
    clipping), after it (at batch end the gradients are still there) and the one logged."""

    def __init__(self):
        self.rows = []

    def _norm(self, module) -> float:
        return float(torch.nn.utils.get_total_norm([p.grad for p in module.model.parameters() if p.grad is not None]))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.before = self._norm(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append((self.before, self._norm(module), float(trainer.callback_metrics["train/grad_norm"])))


@pytest.mark.parametrize("clip", [0.0, 0.01])
def test_logged_grad_norm_is_the_norm_before_clipping(clip):
    norms = NormBeforeAndAfterClip()
    fit(make_module(), 3, gradient_clip_val=clip, callbacks=[norms])
    for before, after, logged in norms.rows:
        assert logged == pytest.approx(before, rel=1e-5)
        assert after == pytest.approx(min(before, clip) if clip else before, rel=1e-4)


def test_clip_folded_into_fused_adamw_trains_as_clipping_the_gradients(monkeypatch):
    """On a GPU the optimizer is fused AdamW and the clip goes into its step (train/clipping.py):
    through Lightning's hooks, the weights after clipped steps are those of clipping the gradients
    first with the unfused optimizer, and not those of no clipping."""
    import train.pretrain

    plain_adamw, plain_release = train.pretrain.adamw, train.pretrain.release

    def weights_after(fused: bool, clip: float):
        folded = []  # per step: was the clip handed to the step (grad_scale set) when released?

        def release(optimizer):
            folded.append(hasattr(optimizer, "grad_scale"))
            plain_release(optimizer)

        monkeypatch.setattr(train.pretrain, "adamw", lambda params, optim, *_, **__: plain_adamw(params, optim, fused))
        monkeypatch.setattr(train.pretrain, "release", release)
        module = make_module()
        _, trainer = fit(module, 3, gradient_clip_val=clip)
        assert folded == [fused and clip > 0] * 3
        assert not hasattr(trainer.optimizers[0], "grad_scale")  # released after each step
        return [p.detach().clone() for p in module.model.parameters()]

    folded, clipped, unclipped = weights_after(True, 0.01), weights_after(False, 0.01), weights_after(True, 0.0)
    for f, c in zip(folded, clipped):
        torch.testing.assert_close(f, c, rtol=1e-5, atol=1e-6)
    assert max((f - u).abs().max().item() for f, u in zip(folded, unclipped)) > 1e-4
