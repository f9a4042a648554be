"""DMD losses on the real tiny OviFusion: forward-pass counts (perf_eval.md §3.3), which model gets
gradients, the teacher's CFG/SLG call, i2v frame 0, determinism, the flow objective, config checks."""
from dataclasses import dataclass, replace

import pytest
import torch

from distill.batch import Batch
from distill.dmd import (
    DMDConfig,
    critic_loss,
    dmd_gradient,
    dmd_loss,
    draw_exit_index,
    flow_loss,
    generator_loss,
    is_generator_step,
    rollout,
)
from distill.flow import STUDENT_SIGMAS
from distill.models import OviFusion

B, C, F, H, W, L, TEXT_LEN, TEXT_DIM = 2, 48, 3, 4, 4, 8, 6, 32
# the tiny model has 3 blocks: Ovi's block 11 would skip nothing. The teacher's two passes run apart
# here so each call can be checked on its own; stacked, they are one call (checked against this).
CFG = DMDConfig(slg_block=1, stack_teacher_passes=False)


@dataclass
class Call:
    model: str
    grad: bool
    skip_block: int | None
    first_frame_clean: bool
    text_video: str
    text_audio: str
    video: torch.Tensor
    t: torch.Tensor
    audio: torch.Tensor = None


class Recorder:
    """Wraps a model; logs every call into a shared list. `perturb` adds to the returned v_video on the
    given frames, to show which outputs a loss can or cannot see."""

    def __init__(self, name, model, log, batch, perturb=None):
        self.name, self.model, self.log, self.batch, self.perturb = name, model, log, batch, perturb

    def _text_name(self, text):
        names = {id(self.batch.text): "text", id(self.batch.neg_text_video): "neg_video",
                 id(self.batch.neg_text_audio): "neg_audio"}
        return names.get(id(text), "other")

    def __call__(self, video, audio, t, text_video, text_audio, first_frame_clean=False, skip_block=None, **extra):
        self.log.append(Call(self.name, torch.is_grad_enabled(), skip_block, first_frame_clean,
                             self._text_name(text_video), self._text_name(text_audio), video.detach().clone(),
                             t.detach().clone(), audio.detach().clone()))
        v_video, v_audio = self.model(video, audio, t, text_video, text_audio,
                                      first_frame_clean=first_frame_clean, skip_block=skip_block, **extra)
        if self.perturb is not None:
            frames, amount = self.perturb
            bump = torch.zeros_like(v_video)
            bump[:, :, frames] = amount
            v_video = v_video + bump
        return v_video, v_audio


def make_batch(i2v: bool, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, C, F, H, W, generator=g)
    return Batch(
        video=video,
        audio=torch.randn(B, L, 20, generator=g),
        text=torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g),
        neg_text_video=torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g),
        neg_text_audio=torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g),
        image_latent=torch.randn(B, C, 1, H, W, generator=g) if i2v else None,
    )


def rng(seed=123):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def weights():
    """Three distinct tiny models' weights (G, F, R); each test builds fresh modules from them."""
    return {name: OviFusion.from_variant("tiny", seed=seed).state_dict() for name, seed in
            (("generator", 1), ("fake", 2), ("teacher", 0))}


def tiny(weights, name):
    model = OviFusion.from_variant("tiny")
    model.load_state_dict(weights[name])
    return model


@pytest.fixture
def models(weights):
    return tiny(weights, "generator"), tiny(weights, "fake"), tiny(weights, "teacher")


def wrap(models, batch, perturb_fake=None, perturb_teacher=None):
    log = []
    gen, fake, teacher = models
    return (Recorder("G", gen, log, batch), Recorder("F", fake, log, batch, perturb_fake),
            Recorder("R", teacher, log, batch, perturb_teacher), log)


def count(log, model, grad):
    return sum(1 for c in log if c.model == model and c.grad == grad)


# ---------------------------------------------------------------------------------------------
# Forward-pass accounting (perf_eval.md §3.3)


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("exit_index", [0, 1, 2, 3])
def test_generator_step_forward_counts(models, exit_index, i2v):
    batch = make_batch(i2v)
    G, Fk, R, log = wrap(models, batch)
    loss, _ = generator_loss(G, Fk, R, batch, exit_index, CFG, rng())
    loss.backward()
    assert (count(log, "G", False), count(log, "G", True)) == (exit_index, 1)
    assert (count(log, "F", False), count(log, "F", True)) == (1, 0)
    assert (count(log, "R", False), count(log, "R", True)) == (2, 0)
    assert len(log) == exit_index + 4
    assert all(c.first_frame_clean == i2v for c in log)
    # the student walks the σ list from pure noise; the grad forward is the exit step
    student = [c for c in log if c.model == "G"]
    assert [c.t[0].item() for c in student] == pytest.approx([1000 * s for s in STUDENT_SIGMAS[: exit_index + 1]])
    assert student[-1].grad
    # one DMD σ, shared by the three score calls, inside the clamp
    scores = [c for c in log if c.model != "G"]
    assert all(torch.equal(c.t, scores[0].t) for c in scores)
    assert ((scores[0].t >= CFG.t_min) & (scores[0].t <= CFG.t_max)).all()


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("exit_index", [0, 1, 2, 3])
def test_critic_step_forward_counts(models, exit_index, i2v):
    batch = make_batch(i2v)
    G, Fk, _, log = wrap(models, batch)
    loss, _ = critic_loss(G, Fk, batch, exit_index, CFG, rng())
    loss.backward()
    assert (count(log, "G", False), count(log, "G", True)) == (exit_index + 1, 0)
    assert (count(log, "F", False), count(log, "F", True)) == (0, 1)
    assert len(log) == exit_index + 2
    assert all(c.first_frame_clean == i2v for c in log)
    assert all((c.text_video, c.text_audio, c.skip_block) == ("text", "text", None) for c in log)


def test_score_calls_texts_and_slg(models):
    batch = make_batch(False)
    G, Fk, R, log = wrap(models, batch)
    generator_loss(G, Fk, R, batch, 2, CFG, rng())
    seen = [(c.model, c.text_video, c.text_audio, c.skip_block) for c in log if c.model != "G"]
    assert sorted(seen, key=str) == sorted([
        ("F", "text", "text", None),                       # fake score: conditional only, no CFG, no SLG
        ("R", "text", "text", None),                       # teacher conditional
        ("R", "neg_video", "neg_audio", CFG.slg_block),    # teacher negative: per-tower negatives + SLG
    ], key=str)
    assert all((c.text_video, c.text_audio, c.skip_block) == ("text", "text", None) for c in log if c.model == "G")


def test_slg_can_be_disabled(models):
    batch = make_batch(False)
    G, Fk, R, log = wrap(models, batch)
    generator_loss(G, Fk, R, batch, 0, DMDConfig(slg_block=None, stack_teacher_passes=False), rng())
    assert all(c.skip_block is None for c in log)


# ---------------------------------------------------------------------------------------------
# Which parameters learn


def grads(model):
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_generator_step_trains_only_the_generator(models, i2v):
    gen, fake, teacher = models
    loss, _ = generator_loss(gen, fake, teacher, make_batch(i2v), 1, CFG, rng())
    loss.backward()
    assert all(g is not None for g in grads(gen))
    assert sum(g.abs().sum().item() for g in grads(gen)) > 0
    assert all(g is None for g in grads(fake) + grads(teacher))


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_critic_step_trains_only_the_fake_score(models, i2v):
    gen, fake, teacher = models
    loss, _ = critic_loss(gen, fake, make_batch(i2v), 3, CFG, rng())
    loss.backward()
    assert all(g is not None for g in grads(fake))
    assert sum(g.abs().sum().item() for g in grads(fake)) > 0
    assert all(g is None for g in grads(gen) + grads(teacher))


# ---------------------------------------------------------------------------------------------
# The DMD gradient


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_dmd_gradient_vanishes_when_fake_score_is_the_teacher_without_cfg(weights, i2v):
    gen, fake, teacher = tiny(weights, "generator"), tiny(weights, "teacher"), tiny(weights, "teacher")
    # passes apart: the fake score and the teacher then see the same batch, so the cancellation is exact
    no_cfg = DMDConfig(cfg_video=1.0, cfg_audio=1.0, slg_block=1, stack_teacher_passes=False)
    loss, metrics = generator_loss(gen, fake, teacher, make_batch(i2v), 2, no_cfg, rng())
    loss.backward()
    assert loss.item() == 0.0
    assert metrics["grad_norm_video"].item() == 0.0 and metrics["grad_norm_audio"].item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads(gen))
    # control: the teacher's CFG alone makes the gradient non-zero
    loss, _ = generator_loss(gen, fake, teacher, make_batch(i2v), 2, CFG, rng())
    assert loss.item() > 0


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_guidance_from_samples_queries_the_teacher_once_on_the_prompt(models, i2v):
    """dmd.guidance=samples: the (fine-tuned) teacher is the real score as is: one no-grad pass on the
    prompt, no negative pass, no SLG, whatever cfg_* say (they name the pairs' guidance)."""
    batch = make_batch(i2v)
    G, Fk, R, log = wrap(models, batch)
    cfg = DMDConfig(slg_block=1, guidance="samples")
    loss, _ = generator_loss(G, Fk, R, batch, 1, cfg, rng())
    loss.backward()
    teacher = [c for c in log if c.model == "R"]
    assert [(c.grad, c.skip_block, c.text_video, c.text_audio) for c in teacher] == [(False, None, "text", "text")]
    assert teacher[0].video.shape[0] == batch.size
    assert all(c.first_frame_clean == i2v for c in log)


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_guidance_from_samples_pulls_towards_the_teachers_own_prediction(weights, i2v):
    """The same loss as the guided form with CFG 1 (u + 1·(c − u) = c, up to rounding): the fake score
    equal to the teacher gives no gradient."""
    gen, fake, teacher = tiny(weights, "generator"), tiny(weights, "teacher"), tiny(weights, "teacher")
    samples = DMDConfig(cfg_video=4.0, cfg_audio=3.0, slg_block=1, guidance="samples")
    loss, _ = generator_loss(gen, fake, teacher, make_batch(i2v), 2, samples, rng())
    assert loss.item() == 0.0
    gen, fake = tiny(weights, "generator"), tiny(weights, "fake")
    unguided = DMDConfig(cfg_video=1.0, cfg_audio=1.0, slg_block=1, stack_teacher_passes=False)
    a, _ = generator_loss(gen, fake, teacher, make_batch(i2v), 2, samples, rng())
    b, _ = generator_loss(gen, fake, teacher, make_batch(i2v), 2, unguided, rng())
    assert a.item() > 0 and a.item() == pytest.approx(b.item(), rel=1e-6)


class ConstantX0:
    """A score model whose x0 is a constant per text: v = (x - x0)/σ."""

    def __init__(self, x0_of_text):
        self.x0_of_text = x0_of_text

    def __call__(self, video, audio, t, text_video, text_audio, first_frame_clean=False, skip_block=None):
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        v_video = (video - self.x0_of_text(text_video)[0]) / sigma
        v_audio = (audio - self.x0_of_text(text_audio)[1]) / sigma.view(-1, 1, 1)
        return v_video, v_audio


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_teacher_cfg_is_standard_form_per_modality_and_normalised_per_sample(models, i2v):
    batch = make_batch(i2v)
    cond, neg, fake_x0 = (1.0, 2.0), (-1.0, 0.5), (0.25, -0.75)  # (video, audio) x0 values

    def teacher_x0(text):
        return cond if text is batch.text else neg

    gen = models[0]
    cfg = DMDConfig(cfg_video=4.0, cfg_audio=3.0, slg_block=None, stack_teacher_passes=False)  # texts told apart by identity
    _, metrics = generator_loss(gen, ConstantX0(lambda _: fake_x0), ConstantX0(teacher_x0), batch, 1, cfg, rng())
    x0_video, x0_audio = rollout(gen, batch, 1, cfg, rng(), with_grad=False)  # rollout draws first from rng
    for x0, k, w, name in ((x0_video[:, :, 1:] if i2v else x0_video, 0, 4.0, "video"), (x0_audio, 1, 3.0, "audio")):
        real = neg[k] + w * (cond[k] - neg[k])  # u + w(c − u); the cond + w(c − u) form gives another value
        norm = (x0.double() - real).abs().flatten(1).mean(1)
        grad = (fake_x0[k] - real) / (norm + cfg.norm_eps)
        assert metrics[f"normaliser_{name}"].item() == pytest.approx(norm.mean().item(), rel=1e-6)
        expected = 0.5 * (grad.pow(2) * x0[0].numel()).sum().item() / x0.numel()
        assert metrics[f"loss_{name}"].item() == pytest.approx(expected, rel=1e-5)


def test_dmd_loss_backpropagates_the_normalised_gradient_with_the_right_sign():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    real = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    fake = real + 0.5  # the critic sees the student's mode above the teacher's
    grad, norm = dmd_gradient(x0.detach(), fake, real, eps=1e-6)
    expected_norm = (x0.detach() - real).abs().mean(dim=(1, 2))
    assert torch.allclose(norm, expected_norm)
    assert torch.allclose(grad, 0.5 / (expected_norm.view(2, 1, 1) + 1e-6).expand_as(grad))
    loss = dmd_loss(x0, grad)
    loss.backward()
    assert torch.allclose(x0.grad, grad / x0.numel())
    assert (x0.grad > 0).all()  # descent lowers x̂0: from the fake mode towards the real one
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item())


def test_dmd_gradient_is_finite_when_the_student_matches_the_teacher():
    x = torch.zeros(1, 4)
    grad, norm = dmd_gradient(x, x + 1, x, eps=1e-6)
    assert norm.item() == 0 and torch.isfinite(grad).all()


def test_a_nan_prediction_reaches_the_loss_for_the_trainer_to_skip():
    x, fake = torch.zeros(1, 4), torch.ones(1, 4)
    fake[0, 2] = float("nan")
    grad, _ = dmd_gradient(x, fake, x, eps=1e-6)
    assert not torch.isfinite(dmd_loss(x, grad))


# ---------------------------------------------------------------------------------------------
# Image-to-video


@pytest.mark.parametrize("exit_index", [0, 3])
def test_i2v_rollout_pins_frame0_and_feeds_the_image_to_every_call(models, exit_index):
    batch = make_batch(True)
    G, Fk, R, log = wrap(models, batch)
    x0_video, _ = rollout(G, batch, exit_index, CFG, rng(), with_grad=False)
    assert torch.equal(x0_video[:, :, :1], batch.image_latent)
    assert not torch.equal(x0_video[:, :, 1:2], batch.video[:, :, 1:2])
    generator_loss(G, Fk, R, batch, exit_index, CFG, rng())
    critic_loss(G, Fk, batch, exit_index, CFG, rng())
    assert all(torch.equal(c.video[:, :, :1], batch.image_latent) for c in log)


@pytest.mark.parametrize("who", ["fake", "teacher"])
def test_i2v_frame0_of_the_score_outputs_does_not_reach_the_generator_loss(models, who):
    batch = make_batch(True)

    def run(frames):
        perturb = (frames, 50.0) if frames is not None else None
        G, Fk, R, _ = wrap(models, batch, **{f"perturb_{who}": perturb})
        loss, metrics = generator_loss(G, Fk, R, batch, 1, CFG, rng())
        return loss, metrics

    base, base_metrics = run(None)
    frame0, frame0_metrics = run(0)
    assert torch.equal(base, frame0)
    assert all(torch.equal(base_metrics[k], frame0_metrics[k]) for k in base_metrics)
    later, _ = run(1)  # control: the same bump on frame 1 is seen
    assert not torch.equal(base, later)


def test_i2v_frame0_of_the_fake_score_velocity_does_not_reach_the_critic_loss(models):
    batch = make_batch(True)

    def run(perturb):
        G, Fk, _, _ = wrap(models, batch, perturb_fake=perturb)
        return critic_loss(G, Fk, batch, 2, CFG, rng())[0]

    base = run(None)
    assert torch.equal(base, run((0, 50.0)))
    assert not torch.equal(base, run((1, 50.0)))


def test_i2v_frame0_is_left_out_of_the_flow_loss(models):
    batch = make_batch(True)
    G, _, _, _ = wrap(models, batch)
    base = flow_loss(G, batch, CFG, rng())[0]
    assert torch.equal(base, flow_loss(Recorder("G", models[0], [], batch, (0, 50.0)), batch, CFG, rng())[0])
    assert not torch.equal(base, flow_loss(Recorder("G", models[0], [], batch, (1, 50.0)), batch, CFG, rng())[0])


class ZeroX0:
    """Predicts x0 = 0 (v = x/σ) and records its inputs, so each re-noised input is σ·(fresh noise)."""

    def __init__(self):
        self.inputs = []

    def __call__(self, video, audio, t, text_video, text_audio, first_frame_clean=False, skip_block=None):
        self.inputs.append((video.detach().clone(), audio.detach().clone()))
        sigma = t.float() / 1000
        return video / sigma.view(-1, 1, 1, 1, 1), audio / sigma.view(-1, 1, 1)


def test_rollout_renoises_with_fresh_noise():
    model = ZeroX0()
    rollout(model, make_batch(False), 3, CFG, rng(), with_grad=False)
    noises = [v / s for (v, _), s in zip(model.inputs, STUDENT_SIGMAS)]
    assert len(noises) == 4
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(noises[a], noises[b])
    assert all(abs(n.std().item() - 1) < 0.2 for n in noises)


def test_rollout_with_implied_renoise_is_deterministic_ddim():
    """renoise='implied': each next input is (1-σ')·x0 + σ'·ε with ε the noise the step's input implied:
    ZeroX0 predicts x0 = 0, so every input is σ_k times the first noise, whatever the rng."""
    inputs = []
    for seed in (1, 2):
        model = ZeroX0()
        rollout(model, make_batch(False), 3, DMDConfig(renoise="implied"), rng(seed), with_grad=False)
        inputs.append(model.inputs)
    first = inputs[0][0][0]
    for (video, audio), sigma in zip(inputs[0], STUDENT_SIGMAS):
        torch.testing.assert_close(video, sigma * first, rtol=0, atol=1e-6)
        torch.testing.assert_close(audio, sigma * inputs[0][0][1], rtol=0, atol=1e-6)
    # the rng only draws the starting noise: same draws give the same walk, fresh ones differ
    assert not torch.allclose(inputs[0][0][0], inputs[1][0][0])


def paired(batch: Batch, seed: int = 5, target_shift: float = 0.0) -> Batch:
    """A teacher-pair batch: its own noise, and targets `target_shift` above the batch's latents."""
    g = torch.Generator().manual_seed(seed)
    return replace(batch, noise_video=torch.randn(batch.video.shape, generator=g),
                   noise_audio=torch.randn(batch.audio.shape, generator=g),
                   target_video=batch.video + target_shift, target_audio=batch.audio + target_shift)


def test_rollout_starts_from_a_pairs_noise_whatever_the_rng():
    batch = paired(make_batch(False))
    for seed in (1, 2):
        model = ZeroX0()
        rollout(model, batch, 3, DMDConfig(renoise="implied"), rng(seed), with_grad=False)
        torch.testing.assert_close(model.inputs[0][0], batch.noise_video, rtol=0, atol=0)
        torch.testing.assert_close(model.inputs[2][1], STUDENT_SIGMAS[2] * batch.noise_audio, rtol=0, atol=1e-6)


def test_regression_term_adds_the_weighted_mse_to_the_teacher_sample(models):
    """generator_loss = DMD + w·(video_weight·mse_video + audio_weight·mse_audio) against the pair's target;
    its gradient pulls the student's x0 towards the target (the DMD part is the same either way)."""
    G, Fk, R = models
    cfg = DMDConfig(slg_block=1, renoise="implied", regression_weight=0.5, audio_weight=2.0)
    batch = paired(make_batch(False))
    x0_video, x0_audio = rollout(G, batch, 2, cfg, rng(), with_grad=False)
    at_target = replace(batch, target_video=x0_video, target_audio=x0_audio)
    base, m0 = generator_loss(G, Fk, R, at_target, 2, cfg, rng())
    assert float(m0["regression_video"]) == pytest.approx(0.0, abs=1e-12)
    off = replace(batch, target_video=x0_video + 1.0, target_audio=x0_audio - 2.0)
    loss, m = generator_loss(G, Fk, R, off, 2, cfg, rng())
    assert float(m["regression_video"]) == pytest.approx(1.0) and float(m["regression_audio"]) == pytest.approx(4.0)
    assert float((loss - base).detach()) == pytest.approx(0.5 * (1.0 + 2.0 * 4.0), rel=1e-6)
    without = generator_loss(G, Fk, R, off, 2, replace(cfg, regression_weight=0.0), rng())[0]
    assert float(without.detach()) == pytest.approx(float(base.detach()), rel=1e-9)
    # d(loss)/d(x0) of the regression part points from the target to x0: a step against it moves x0 to the target
    G.zero_grad()
    generator_loss(G, Fk, R, off, 2, replace(cfg, video_weight=0.0, audio_weight=1.0), rng())[0].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())


def test_regression_needs_the_deterministic_student_sampler():
    with pytest.raises(ValueError, match="renoise='implied'"):
        DMDConfig(regression_weight=1.0, renoise="fresh")
    with pytest.raises(ValueError, match="regression_weight"):
        DMDConfig(regression_weight=-1.0, renoise="implied")


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("slg_block", [1, None])
def test_stacked_teacher_passes_give_the_same_loss_in_one_call(models, i2v, slg_block):
    """One teacher forward at 2B (the SLG block skipped for the negative half only) equals the
    conditional and the negative passes run apart."""
    batch = make_batch(i2v)
    losses, logs = [], []
    for stacked in (False, True):
        cfg = DMDConfig(slg_block=slg_block, stack_teacher_passes=stacked)
        G, Fk, R, log = wrap(models, batch)
        loss, metrics = generator_loss(G, Fk, R, batch, 1, cfg, rng())
        losses.append((loss.detach(), metrics["grad_norm_video"], metrics["grad_norm_audio"]))
        logs.append(log)
    for a, b in zip(*losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    teacher_calls = [c for c in logs[1] if c.model == "R"]
    assert len(teacher_calls) == 1 and teacher_calls[0].video.shape[0] == 2 * B
    assert teacher_calls[0].skip_block == slg_block
    assert count(logs[0], "R", False) == 2


def test_skip_samples_skips_the_block_for_those_samples_only(weights):
    model = tiny(weights, "teacher")
    batch = make_batch(False)
    t = torch.full((B,), 700.0)
    with torch.no_grad():
        full = model(batch.video, batch.audio, t, batch.text, batch.text)
        slg = model(batch.video, batch.audio, t, batch.text, batch.text, skip_block=1)
        mixed = model(batch.video, batch.audio, t, batch.text, batch.text, skip_block=1,
                      skip_samples=torch.tensor([False, True]))
    for m in range(2):
        torch.testing.assert_close(mixed[m][0], full[m][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[m][1], slg[m][1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(full[m][1], slg[m][1])
    with pytest.raises(ValueError, match="skip_samples"):
        model(batch.video, batch.audio, t, batch.text, batch.text, skip_block=1, skip_samples=torch.tensor([1, 0]))


def test_same_rng_state_gives_identical_losses_and_gradients(models):
    gen, fake, teacher = models
    batch = make_batch(True)

    def step(seed):
        gen.zero_grad(set_to_none=True)
        loss, metrics = generator_loss(gen, fake, teacher, batch, 2, CFG, rng(seed))
        loss.backward()
        closs, _ = critic_loss(gen, fake, batch, 1, CFG, rng(seed))
        return loss.detach(), metrics, closs.detach(), [p.grad.clone() for p in gen.parameters()]

    a, b, c = step(5), step(5), step(6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])


def test_global_rng_is_not_used(models):
    gen, fake, teacher = models
    batch = make_batch(False)
    torch.manual_seed(0)
    a = generator_loss(gen, fake, teacher, batch, 1, CFG, rng())[0]
    torch.manual_seed(1)
    b = generator_loss(gen, fake, teacher, batch, 1, CFG, rng())[0]
    assert torch.equal(a, b)


def test_one_noise_level_for_both_modalities():
    """With x̂0 = 0 the score models see x_t = σ·ε: both towers' inputs must have std σ = t/1000."""
    batch = make_batch(False)
    log = []
    fake = Recorder("F", ConstantX0(lambda _: (0.0, 0.0)), log, batch)
    teacher = Recorder("R", ConstantX0(lambda _: (0.0, 0.0)), log, batch)
    for seed in range(3):
        log.clear()
        generator_loss(ZeroX0(), fake, teacher, batch, 1, CFG, rng(seed))
        critic_loss(ZeroX0(), fake, batch, 2, CFG, rng(seed))
        assert len(log) == 4
        for call in log:
            sigma = call.t / 1000
            assert torch.allclose(call.video.flatten(1).std(1), sigma, rtol=0.1)
            assert torch.allclose(call.audio.flatten(1).std(1), sigma, rtol=0.3)


def test_modality_weights_scale_the_total(models):
    gen, fake, teacher = models
    batch = make_batch(True)
    weighted = DMDConfig(slg_block=1, video_weight=2.0, audio_weight=0.5)
    for loss, metrics in (generator_loss(gen, fake, teacher, batch, 1, weighted, rng()),
                          critic_loss(gen, fake, batch, 1, weighted, rng()),
                          flow_loss(gen, batch, weighted, rng())):
        assert loss.item() == pytest.approx(2.0 * metrics["loss_video"].item() + 0.5 * metrics["loss_audio"].item())
        assert metrics["loss_video"].item() > 0 and metrics["loss_audio"].item() > 0


def test_is_generator_step_is_one_in_critic_ratio():
    assert [s for s in range(16) if is_generator_step(s, CFG)] == [0, 5, 10, 15]
    assert all(is_generator_step(s, DMDConfig(critic_ratio=1)) for s in range(4))


def test_draw_exit_index_is_uniform_and_reproducible():
    draws = [draw_exit_index(rng(3), 4) for _ in range(3)]
    assert len(set(draws)) == 1
    g = rng(4)
    many = [draw_exit_index(g, 4) for _ in range(400)]
    assert set(many) == {0, 1, 2, 3}
    assert all(60 < many.count(k) < 140 for k in range(4))
    with pytest.raises(ValueError, match="n_steps"):
        draw_exit_index(g, 0)


@pytest.mark.parametrize("bad", [-1, 4, 1.0, True])
def test_rollout_rejects_bad_exit_index(bad):
    with pytest.raises(ValueError, match="exit_index"):
        rollout(ZeroX0(), make_batch(False), bad, CFG, rng(), with_grad=False)


# ---------------------------------------------------------------------------------------------
# objective: flow


def test_flow_loss_decreases_with_adam(weights):
    model = tiny(weights, "generator")
    batch = make_batch(False)
    cfg = DMDConfig(flow_shift=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def evaluate():
        with torch.no_grad():
            return sum(flow_loss(model, batch, cfg, rng(1000 + k))[0].item() for k in range(4)) / 4

    before = evaluate()
    train_rng = rng(0)
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        loss, metrics = flow_loss(model, batch, cfg, train_rng)
        loss.backward()
        opt.step()
    assert set(metrics) == {"loss_video", "loss_audio", "sigma"}
    after = evaluate()
    assert after < 0.8 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("field, value", [
    ("student_sigmas", ()),
    ("student_sigmas", (0.9, 0.5)),
    ("student_sigmas", (1.0, 0.5, 0.7)),
    ("shift", 0.0),
    ("t_min", 990),
    ("t_max", 1001),
    ("cfg_video", -1.0),
    ("cfg_audio", float("nan")),
    ("video_weight", -0.5),
    ("slg_block", -1),
    ("norm_eps", 0.0),
    ("critic_ratio", 0),
    ("flow_shift", -1.0),
    ("renoise", "ode"),
    ("guidance", "cfg"),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DMDConfig(**{field: value})


def test_config_defaults_follow_the_spec():
    cfg = DMDConfig()
    assert cfg.student_sigmas == STUDENT_SIGMAS and cfg.n_steps == 4
    assert (cfg.shift, cfg.t_min, cfg.t_max) == (5.0, 20, 980)
    assert (cfg.cfg_video, cfg.cfg_audio, cfg.slg_block) == (4.0, 3.0, 11)
    assert (cfg.video_weight, cfg.audio_weight, cfg.norm_eps, cfg.critic_ratio) == (1.0, 1.0, 1e-6, 5)
    assert DMDConfig(student_sigmas=[1.0, 0.5]).student_sigmas == (1.0, 0.5)  # YAML lists become tuples
    with pytest.raises(ValueError, match="video_weight and audio_weight"):
        DMDConfig(video_weight=0.0, audio_weight=0.0)
