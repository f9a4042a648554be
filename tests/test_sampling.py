"""Samplers: golden reproduction of Ovi's solvers, the teacher loop (CFG, SLG, i2v), the student loop."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from distill.flow import STUDENT_SIGMAS
from distill.sampling import (
    DPMPPSolver,
    EulerSolver,
    TeacherSamplerConfig,
    UniPCSolver,
    classifier_free_guidance,
    make_solver,
    pin_first_frame,
    sample_student,
    sample_teacher,
    unipc_schedule,
)

# ---------------------------------------------------------------------------------------------
# Golden: unipc_flow.safetensors, driven by v(x, t) = 0.3x + 0.1 sin(x) + (t/1000) c

GOLDEN_KEY = {"unipc": "unipc", "euler": "euler", "dpm++": "dpmpp"}
# float64: the solvers' coefficients are float32 scalars made with exp/log, as in the reference, and
# CPUs' vector math libraries can differ in their last bit: one float32 ulp of a coefficient moves a
# sample by ~1e-7, and such differences add up over a walk (seen: up to 4.9e-7 on one machine after 50
# steps, bit-exact on another); a wrong coefficient or order moves samples by 1e-3 and more
ATOL = {torch.float64: 1e-6, torch.float32: 5e-6, torch.bfloat16: 0.15}


@pytest.fixture(scope="module")
def flow_golden(golden):
    return load_file(golden / "unipc_flow.safetensors"), json.loads((golden / "unipc_flow.json").read_text())


def synthetic_velocity(x, t, c):
    return 0.3 * x + 0.1 * torch.sin(x) + (t / 1000) * c


@pytest.mark.parametrize("steps", [50, 30])
@pytest.mark.parametrize("solver", ["unipc", "euler", "dpm++"])
def test_schedule_matches_golden(flow_golden, solver, steps):
    tensors, meta = flow_golden
    key = f"{GOLDEN_KEY[solver]}.steps{steps}"
    schedule = make_solver(solver, steps).schedule
    assert schedule.timesteps.dtype == tensors[f"{key}.timesteps"].dtype
    assert torch.equal(schedule.timesteps, tensors[f"{key}.timesteps"])
    assert schedule.sigmas.dtype == torch.float32
    assert torch.equal(schedule.sigmas, tensors[f"{key}.sigmas"])
    assert [float(t) for t in schedule.timesteps.tolist()] == meta["runs"][key]["t_values_fed_to_velocity"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [50, 30])
@pytest.mark.parametrize("solver", ["unipc", "euler", "dpm++"])
def test_solver_reproduces_every_golden_sample(flow_golden, solver, steps, dtype):
    tensors, _ = flow_golden
    key = f"{GOLDEN_KEY[solver]}.steps{steps}"
    dtype_name = str(dtype).removeprefix("torch.")
    samples = tensors[f"{key}.{dtype_name}.samples"]
    s = make_solver(solver, steps)
    x, c = tensors["inputs.x_T"].to(dtype), tensors["constants.c"].to(dtype)
    for i, t in enumerate(s.schedule.timesteps.tolist()):
        v = synthetic_velocity(x, float(t), c)
        if dtype == torch.float64:
            # The synthetic model's sin/cos differ between CPUs' vector math libraries in the last bits
            # (2e-12 seen), and the solver amplifies that near σ = 0; so the float64 walk steps with the
            # reference's own model outputs, and the solver's arithmetic is what is compared exactly.
            golden_v = tensors[f"{key}.float64.model_outputs"][i]
            torch.testing.assert_close(synthetic_velocity(samples[i], float(t), c), golden_v, rtol=0, atol=1e-10)
            v = golden_v
        x = s.step(v, x)
        assert x.dtype == dtype
        torch.testing.assert_close(x, samples[i + 1], rtol=0, atol=ATOL[dtype], msg=lambda m: f"step {i}: {m}")
        if dtype == torch.float64 and solver in ("unipc", "dpm++"):
            torch.testing.assert_close(s.x0_pred, tensors[f"{key}.float64.x0_preds"][i], rtol=0, atol=ATOL[dtype])
        if dtype == torch.float64 and solver == "unipc":
            corrected = tensors[f"{key}.float64.corrected_samples"][i]
            torch.testing.assert_close(s.corrected_sample, corrected, rtol=0, atol=ATOL[dtype])
    torch.testing.assert_close(x, tensors[f"{key}.{dtype_name}.final"], rtol=0, atol=ATOL[dtype])


def test_unipc_bfloat16_run_is_close_to_the_indicative_golden(flow_golden):
    tensors, _ = flow_golden
    s = UniPCSolver(50)
    x, c = tensors["inputs.x_T"].to(torch.bfloat16), tensors["constants.c"].float()
    for t in s.schedule.timesteps.tolist():
        x = s.step(synthetic_velocity(x.float(), float(t), c).to(torch.bfloat16), x)
    assert x.dtype == torch.bfloat16
    torch.testing.assert_close(x.float(), tensors["unipc.steps50.bfloat16.samples"][-1], rtol=0, atol=0.15)


def test_unipc_last_step_returns_the_x0_prediction():
    s = UniPCSolver(3)
    x = torch.randn(2, 3, dtype=torch.float64)
    for _ in range(3):
        v = torch.randn_like(x)
        sigma = s.schedule.sigmas[s.step_index].item()
        x_next = s.step(v, x)
    assert s.schedule.sigmas[-1] == 0
    torch.testing.assert_close(x_next, x - sigma * v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [UniPCSolver, EulerSolver, DPMPPSolver])
def test_solver_refuses_extra_steps_and_shape_mismatch(cls):
    s = cls(2)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="same shape"):
        s.step(torch.zeros(1, 5), x)
    s.step(x, x)
    s.step(x, x)
    with pytest.raises(RuntimeError, match="all 2 steps"):
        s.step(x, x)


def test_make_solver_and_config_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown solver 'ddim'"):
        make_solver("ddim", 10)
    with pytest.raises(ValueError, match="unknown solver"):
        TeacherSamplerConfig(solver="heun")
    with pytest.raises(ValueError, match="steps"):
        TeacherSamplerConfig(steps=0)


# ---------------------------------------------------------------------------------------------
# Fake models: the sampler sees only the model contract


B, C, F, H, W, L = 2, 48, 3, 2, 2, 5


def const_text(value):
    return torch.full((B, 4, 8), float(value))


class RecordingModel:
    """Records every call. Its velocity is `a·x + text value` per tower: it tells which text each tower
    got, and the video tower adds `skip_block` (so a skip that leaks into the positive pass shows)."""

    def __init__(self, a=0.0):
        self.a = a
        self.calls = []

    def __call__(self, video, audio, t, text_video, text_audio, first_frame_clean=False, skip_block=None):
        self.calls.append(
            dict(
                video=video.clone(),
                audio=audio.clone(),
                t=t.clone(),
                text_video=text_video,
                text_audio=text_audio,
                first_frame_clean=first_frame_clean,
                skip_block=skip_block,
            )
        )
        skip = 0.0 if skip_block is None else 100.0 * skip_block
        v_video = self.a * video + text_video[0, 0, 0] + skip
        v_audio = self.a * audio + text_audio[0, 0, 0]
        return v_video, v_audio


def noises(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, F, H, W, generator=g, dtype=dtype), torch.randn(B, L, 20, generator=g, dtype=dtype)


def test_teacher_cfg_is_standard_form_per_modality():
    # Euler with one step goes σ = 1 → 0, so the result is x - guided velocity: the guidance is visible.
    text, neg_v, neg_a = const_text(1.0), const_text(-2.0), const_text(5.0)
    cfg = TeacherSamplerConfig(steps=1, solver="euler", cfg_video=4.0, cfg_audio=3.0, slg_block=None)
    video, audio = noises()
    out_v, out_a = sample_teacher(RecordingModel(), video, audio, text, neg_v, neg_a, cfg)
    torch.testing.assert_close(video - out_v, torch.full_like(video, -2.0 + 4.0 * (1.0 - -2.0)))
    torch.testing.assert_close(audio - out_a, torch.full_like(audio, 5.0 + 3.0 * (1.0 - 5.0)))


def test_teacher_without_guidance_runs_the_positive_pass_alone():
    text, neg_v, neg_a = const_text(1.0), const_text(-2.0), const_text(5.0)
    cfg = TeacherSamplerConfig(steps=1, solver="euler", cfg_video=1.0, cfg_audio=1.0, slg_block=11)
    video, audio = noises()
    model = RecordingModel()
    out_v, out_a = sample_teacher(model, video, audio, text, neg_v, neg_a, cfg)
    assert len(model.calls) == 1 and model.calls[0]["text_video"] is text and model.calls[0]["skip_block"] is None
    torch.testing.assert_close(video - out_v, torch.full_like(video, 1.0))
    torch.testing.assert_close(audio - out_a, torch.full_like(audio, 1.0))
    # one scale off 1 guides both towers' passes again
    model = RecordingModel()
    sample_teacher(model, video, audio, text, neg_v, neg_a, dataclasses.replace(cfg, cfg_audio=3.0))
    assert len(model.calls) == 2


def test_classifier_free_guidance_scale_one_is_the_conditional_prediction():
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(classifier_free_guidance(c, u, 1.0), c)
    torch.testing.assert_close(classifier_free_guidance(c, u, 0.0), u)
    torch.testing.assert_close(classifier_free_guidance(c, u, 4.0), u + 4.0 * (c - u))


def test_teacher_passes_texts_skip_block_and_the_unipc_timesteps():
    text, neg_v, neg_a = const_text(1.0), const_text(-2.0), const_text(5.0)
    cfg = TeacherSamplerConfig(steps=6, slg_block=11)
    model = RecordingModel(a=0.1)
    sample_teacher(model, *noises(), text, neg_v, neg_a, cfg)
    assert len(model.calls) == 2 * 6
    pos, neg = model.calls[0::2], model.calls[1::2]
    assert all(c["text_video"] is text and c["text_audio"] is text and c["skip_block"] is None for c in pos)
    assert all(c["text_video"] is neg_v and c["text_audio"] is neg_a and c["skip_block"] == 11 for c in neg)
    assert all(c["first_frame_clean"] is False for c in model.calls)
    expected_t = [float(t) for t in unipc_schedule(6).timesteps.tolist()]
    for k, (p, n) in enumerate(zip(pos, neg)):
        assert p["t"].dtype == torch.float32 and p["t"].shape == (B,)
        assert p["t"].tolist() == [expected_t[k]] * B and n["t"].tolist() == [expected_t[k]] * B
        assert torch.equal(p["video"], n["video"]) and torch.equal(p["audio"], n["audio"])


@pytest.mark.parametrize("slg_block", [None, 0, -1])
def test_teacher_slg_disabled(slg_block):
    model = RecordingModel()
    cfg = TeacherSamplerConfig(steps=2, slg_block=slg_block)
    sample_teacher(model, *noises(), const_text(1), const_text(2), const_text(3), cfg)
    assert all(c["skip_block"] is None for c in model.calls)


def test_teacher_i2v_pins_frame_zero_before_every_call_and_after_the_loop():
    image = torch.randn(B, C, 1, H, W, generator=torch.Generator().manual_seed(3))
    model = RecordingModel(a=0.2)
    cfg = TeacherSamplerConfig(steps=4)
    out_v, _ = sample_teacher(model, *noises(), const_text(1), const_text(2), const_text(3), cfg, image_latent=image)
    assert len(model.calls) == 8
    for call in model.calls:
        assert call["first_frame_clean"] is True
        assert torch.equal(call["video"][:, :, :1], image)
    # frames 1.. evolve: the pin touches frame 0 only
    assert not torch.equal(model.calls[-1]["video"][:, :, 1:], model.calls[0]["video"][:, :, 1:])
    assert torch.equal(out_v[:, :, :1], image)


def test_teacher_steps_video_and_audio_with_independent_solvers():
    # The audio tower's velocity depends only on audio, so the audio result must equal a lone UniPC run.
    text, neg_v, neg_a = const_text(1.0), const_text(-2.0), const_text(5.0)
    cfg = TeacherSamplerConfig(steps=5, cfg_audio=3.0)
    video, audio = noises(dtype=torch.float64)
    _, out_a = sample_teacher(RecordingModel(a=0.3), video, audio, text, neg_v, neg_a, cfg)
    solver, x = UniPCSolver(5), audio
    for _ in range(5):
        x = solver.step(classifier_free_guidance(0.3 * x + 1.0, 0.3 * x + 5.0, 3.0), x)
    torch.testing.assert_close(out_a, x, rtol=0, atol=1e-12)


def test_teacher_rejects_mismatched_inputs():
    video, audio = noises()
    with pytest.raises(ValueError, match="batch sizes differ"):
        sample_teacher(RecordingModel(), video, audio[:1], const_text(1), const_text(2), const_text(3))
    with pytest.raises(ValueError, match="image_latent must have shape"):
        pin_first_frame(video, torch.zeros(B, C, 2, H, W))


# ---------------------------------------------------------------------------------------------
# Student


class X0TargetModel:
    """Returns the velocity whose x0 is a known constant per call: x0_k = k + 1 (video) and -(k + 1) (audio)."""

    def __init__(self):
        self.calls = []

    def __call__(self, video, audio, t, text_video, text_audio, first_frame_clean=False, skip_block=None):
        k = len(self.calls)
        self.calls.append(
            dict(video=video.clone(), audio=audio.clone(), t=t.clone(), first_frame_clean=first_frame_clean,
                 skip_block=skip_block, text_video=text_video, text_audio=text_audio)
        )
        sigma = t.double().view(-1, *[1] * (video.ndim - 1)) / 1000
        sigma_a = t.double().view(-1, 1, 1) / 1000
        v_video = (video.double() - (k + 1)) / sigma
        v_audio = (audio.double() + (k + 1)) / sigma_a
        return v_video.to(video.dtype), v_audio.to(audio.dtype)


def test_student_four_conditional_calls_at_1000_sigma_and_returns_last_x0():
    model = X0TargetModel()
    text = const_text(1.0)
    out_v, out_a = sample_student(model, *noises(), text, generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == 4
    for call, sigma in zip(model.calls, STUDENT_SIGMAS):
        assert call["t"].dtype == torch.float32
        torch.testing.assert_close(call["t"], torch.full((B,), 1000 * sigma), rtol=0, atol=1e-4)
        assert call["skip_block"] is None and call["first_frame_clean"] is False
        assert call["text_video"] is text and call["text_audio"] is text
    torch.testing.assert_close(out_v, torch.full_like(out_v, 4.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(out_a, torch.full_like(out_a, -4.0), rtol=0, atol=1e-5)


def implied_noises(calls, sigmas, modality, sign):
    """ε_k from the model's input at step k+1: x = (1-σ)·x0_k + σ·ε_k."""
    return [
        (calls[k + 1][modality] - (1 - sigmas[k + 1]) * sign * (k + 1)) / sigmas[k + 1]
        for k in range(len(sigmas) - 1)
    ]


def test_student_renoises_with_fresh_gaussian_noise_from_the_generator():
    video, audio = noises()
    model_a, model_b, model_c = X0TargetModel(), X0TargetModel(), X0TargetModel()
    sample_student(model_a, video, audio, const_text(1), generator=torch.Generator().manual_seed(5))
    sample_student(model_b, video, audio, const_text(1), generator=torch.Generator().manual_seed(5))
    sample_student(model_c, video, audio, const_text(1), generator=torch.Generator().manual_seed(6))
    assert torch.equal(model_a.calls[0]["video"], video)  # σ = 1: the first input is the noise itself
    eps_v = implied_noises(model_a.calls, STUDENT_SIGMAS, "video", 1)
    eps_a = implied_noises(model_a.calls, STUDENT_SIGMAS, "audio", -1)
    for eps in eps_v + eps_a:
        assert abs(eps.mean().item()) < 0.25 and eps.std().item() == pytest.approx(1.0, abs=0.25)
    for earlier, later in [(0, 1), (1, 2), (0, 2)]:
        assert (eps_v[earlier] - eps_v[later]).abs().max() > 0.5
    assert (eps_v[0] - video).abs().max() > 0.5
    for call_a, call_b, call_c in zip(model_a.calls[1:], model_b.calls[1:], model_c.calls[1:]):
        assert torch.equal(call_a["video"], call_b["video"]) and torch.equal(call_a["audio"], call_b["audio"])
        assert not torch.equal(call_a["video"], call_c["video"])


class ConstantX0Model(X0TargetModel):
    """x0 = 3 (video) and -3 (audio) at every call."""

    def __call__(self, video, audio, t, *args, **kwargs):
        self.calls.append(dict(video=video.clone(), audio=audio.clone(), t=t.clone()))
        sigma = t.double().view(-1, *[1] * (video.ndim - 1)) / 1000
        sigma_a = t.double().view(-1, 1, 1) / 1000
        return ((video.double() - 3) / sigma).to(video.dtype), ((audio.double() + 3) / sigma_a).to(audio.dtype)


def test_student_implied_renoise_is_deterministic_and_reuses_the_first_noise():
    """renoise='implied' re-noises with the noise the step's input implied (DDIM): with a constant
    x0 every input is (1-σ_k)·x0 + σ_k·(the starting noise), and the generator is never drawn from."""
    video, audio = noises()
    model_a, model_b = ConstantX0Model(), ConstantX0Model()
    out_a = sample_student(model_a, video, audio, const_text(1), generator=torch.Generator().manual_seed(5), renoise="implied")
    out_b = sample_student(model_b, video, audio, const_text(1), generator=torch.Generator().manual_seed(6), renoise="implied")
    assert len(model_a.calls) == 4
    for call, sigma in zip(model_a.calls, STUDENT_SIGMAS):
        torch.testing.assert_close(call["video"], (1 - sigma) * 3 + sigma * video, rtol=0, atol=1e-5)
        torch.testing.assert_close(call["audio"], (1 - sigma) * -3 + sigma * audio, rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    with pytest.raises(ValueError, match="renoise"):
        sample_student(model_a, video, audio, const_text(1), renoise="ode")


def test_student_i2v_pins_frame_zero_of_inputs_and_x0():
    image = torch.randn(B, C, 1, H, W, generator=torch.Generator().manual_seed(9))
    model = X0TargetModel()
    out_v, _ = sample_student(model, *noises(), const_text(1), image_latent=image, generator=torch.Generator())
    for call in model.calls:
        assert call["first_frame_clean"] is True
        assert torch.equal(call["video"][:, :, :1], image)
    assert torch.equal(out_v[:, :, :1], image)
    torch.testing.assert_close(out_v[:, :, 1:], torch.full_like(out_v[:, :, 1:], 4.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sigmas", [(1.0, 1.0), (0.5, 0.8), (1.2, 0.5), (0.5, 0.0), ()])
def test_student_rejects_bad_sigmas(sigmas):
    with pytest.raises(ValueError, match="sigma"):
        sample_student(X0TargetModel(), *noises(), const_text(1), sigmas=sigmas)
