"""distill/eval_metrics.py on synthetic latents with known answers: a student equal to the teacher
scores 0; saturated, collapsed and noisier students score worse the more they are distorted; the
score stays finite and fast at the evaluator's N (8) and the toy world's (768)."""
import math

import pytest
import torch

from distill.eval_metrics import (
    audio_change_energy, checkpoint_metrics, frechet_distance_diagonal, video_frame_features, video_motion_energy,
)

SHAPE = dict(n=64, c=8, f=6, h=4, w=4, l=24, a=6)


def synthetic_world(seed: int, n: int, c: int, f: int, h: int, w: int, l: int, a: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-like latents with structure the metrics should see: per-channel offsets and scales,
    an object appearing at a random frame and place (every channel), and a tone in one audio
    channel starting at the same moment on the audio timeline."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-1, 1, c).view(1, c, 1, 1, 1)               # fixed: the "VAE's" channel means
    scales = torch.linspace(0.5, 1.5, c).view(1, c, 1, 1, 1)
    video = offsets + 0.3 * scales * torch.randn(n, c, f, h, w, generator=g)
    event = torch.randint(1, f, (n,), generator=g)
    rows, cols = torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)
    amp = 2.0 + 0.3 * torch.randn(n, generator=g)
    audio = 0.3 * torch.randn(n, l, a, generator=g)
    tone = torch.randint(0, a, (n,), generator=g)
    for i in range(n):
        video[i, :, event[i]:, rows[i], cols[i]] += amp[i] * scales[0, :, 0, 0, 0, None]
        onset = int(event[i]) * l // f
        audio[i, onset:, tone[i]] += amp[i]
    return video, audio


@pytest.fixture(scope="module")
def teacher():
    return synthetic_world(0, **SHAPE)


def score_of(student, teacher) -> float:
    return checkpoint_metrics(*student, *teacher)["score"]


def test_a_student_equal_to_the_teacher_scores_zero(teacher):
    m = checkpoint_metrics(*teacher, *teacher)
    assert m["score"] == pytest.approx(0.0, abs=1e-12)
    for key in ("fd_video", "fd_audio", "paired_video", "paired_audio", "av_sync_gap", "channel_mean_shift_video"):
        assert m[key] == pytest.approx(0.0, abs=1e-12), key
    for key in ("diversity_video", "diversity_audio", "channel_std_ratio_video", "channel_std_ratio_worst_audio"):
        assert m[key] == pytest.approx(1.0, abs=1e-12), key
    assert m["av_sync_teacher"] > 0.5, "the synthetic world's sound starts when its picture changes"


def test_an_independent_draw_of_the_same_world_is_close_but_not_paired(teacher):
    m = checkpoint_metrics(*synthetic_world(1, **SHAPE), *teacher)
    assert m["score"] < 0.3
    assert 0.7 < m["paired_video"] < 1.3 and 0.7 < m["paired_audio"] < 1.3   # unrelated samples: ~1
    assert 0.85 < m["diversity_video"] < 1.15


def saturated(t, k):
    return t[0] * k, t[1] * k


def collapsed(t, alpha):
    """alpha 1: the teacher; 0: every sample is the teacher's mean sample (mode collapse)."""
    return tuple(x.mean(0, keepdim=True) + alpha * (x - x.mean(0, keepdim=True)) for x in t)


def noisier(t, eps):
    g = torch.Generator().manual_seed(5)
    return tuple(x + eps * torch.randn(x.shape, generator=g) for x in t)


@pytest.mark.parametrize("distort, levels", [
    (saturated, (1.25, 1.5, 2.0, 3.0)),
    (collapsed, (0.75, 0.5, 0.25, 0.0)),
    (noisier, (0.25, 0.5, 1.0, 2.0)),
], ids=["saturated", "collapsed", "noisier"])
def test_distorted_students_score_worse_the_more_they_are_distorted(teacher, distort, levels):
    fresh = score_of(synthetic_world(1, **SHAPE), teacher)     # what sampling noise alone costs
    scores = [score_of(distort(teacher, level), teacher) for level in levels]
    assert all(math.isfinite(s) for s in scores)
    assert fresh < scores[0], (fresh, scores)
    assert scores == sorted(scores) and len(set(scores)) == len(scores), scores


def test_the_statistics_name_the_failure(teacher):
    hot = checkpoint_metrics(*saturated(teacher, 2.0), *teacher)
    assert hot["channel_std_ratio_video"] == pytest.approx(2.0, rel=1e-9)
    assert hot["diversity_video"] == pytest.approx(2.0, rel=1e-9) and hot["diversity_audio"] == pytest.approx(2.0, rel=1e-9)
    flat = checkpoint_metrics(*collapsed(teacher, 0.0), *teacher)
    assert flat["diversity_video"] == pytest.approx(1e-6) and flat["channel_std_ratio_audio"] < 0.5
    assert flat["paired_audio"] == pytest.approx(0.5 * (SHAPE["n"] - 1) / SHAPE["n"], rel=1e-6), \
        "the mean sample is half as far from each teacher sample as two teacher samples are from each other"
    assert flat["fd_audio"] > 0.5


def test_audio_out_of_step_with_the_picture_shows_in_the_av_gap(teacher):
    video, audio = teacher
    shifted = torch.roll(audio, shifts=SHAPE["l"] // 2, dims=1)     # same sounds, half a clip late
    m = checkpoint_metrics(video, shifted, *teacher)
    assert m["av_sync_student"] < m["av_sync_teacher"] - 0.5
    assert m["av_sync_gap"] > 0.5


def test_energy_curves_line_up_on_one_timeline():
    video = torch.zeros(1, 2, 5, 2, 2)
    video[:, :, 3:] = 1.0                      # the picture changes into latent frame 3
    audio = torch.zeros(1, 20, 3)
    audio[:, 12:] = 1.0                        # the sound changes at row 12 of 20: bin 3 of 5
    assert video_motion_energy(video)[0].argmax().item() == 2       # index k-1 holds the change into frame k
    assert audio_change_energy(audio, 5)[0].argmax().item() == 2


def test_features_and_diagonal_distance_by_hand():
    video = torch.arange(16.0).view(1, 1, 1, 4, 4)
    feats = video_frame_features(video)[0, 0]
    assert feats[:4].tolist() == [2.5, 4.5, 10.5, 12.5]            # 2x2 cell means
    assert feats[4].item() == pytest.approx(torch.arange(16.0).std(unbiased=False).item())
    ref = torch.tensor([[0.0], [2.0]])                               # mean 1, std 1
    assert frechet_distance_diagonal(torch.tensor([[3.0], [5.0]]), ref) == pytest.approx(9.0)   # mean moved 3 std
    assert frechet_distance_diagonal(torch.tensor([[-1.0], [3.0]]), ref) == pytest.approx(1.0)  # twice the std


def test_small_and_toy_world_sizes():
    small = checkpoint_metrics(*synthetic_world(2, **{**SHAPE, "n": 8}), *synthetic_world(3, **{**SHAPE, "n": 8}))
    assert all(math.isfinite(v) for v in small.values())
    toy = dict(n=768, c=48, f=5, h=4, w=4, l=22, a=20)
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(toy["n"], 48, 5, 4, 4, generator=g), torch.randn(toy["n"], 22, 20, generator=g))
    reference = (torch.randn(toy["n"], 48, 5, 4, 4, generator=g), torch.randn(toy["n"], 22, 20, generator=g))
    m = checkpoint_metrics(*student, *reference)
    assert m["score"] < 0.05, m      # two draws of one Gaussian at N = 768: close to 0


@pytest.mark.parametrize("change, needle", [
    (lambda sv, sa, tv, ta: (sv[:1], sa[:1], tv[:1], ta[:1]), "at least 2 samples"),
    (lambda sv, sa, tv, ta: (sv[:, :, :2], sa, tv[:, :, :2], ta), "at least 3 video latent frames"),
    (lambda sv, sa, tv, ta: (sv[:4], sa, tv, ta), "shapes differ"),
    (lambda sv, sa, tv, ta: (sv[:, :, :, :, :, None], sa, tv, ta), "5-d tensor"),
    (lambda sv, sa, tv, ta: (sv * float("nan"), sa, tv, ta), "NaN"),
])
def test_bad_inputs_are_named(teacher, change, needle):
    with pytest.raises(ValueError, match=needle):
        checkpoint_metrics(*change(*teacher, *teacher))


def two_spot_world(seed: int, prompts: int, per_prompt: int, drop_mode: bool):
    """Each prompt's object appears at one of two places of its own (a coin flip per sample); with
    drop_mode it is always the first. Pooled over prompts, the places still all occur."""
    g = torch.Generator().manual_seed(seed)
    n = prompts * per_prompt
    video = 0.1 * torch.randn(n, 4, 4, 4, 4, generator=g)
    audio = 0.1 * torch.randn(n, 12, 3, generator=g)
    labels = torch.arange(prompts).repeat_interleave(per_prompt)
    places = [(0, 0), (3, 3), (0, 3), (3, 0)]
    for i in range(n):
        p = int(labels[i])
        mode = 0 if drop_mode else int(torch.randint(0, 2, (1,), generator=g))
        row, col = places[(p + 2 * mode) % 4]
        video[i, :, 1:, row, col] += 2.0
        audio[i, 3:, p % 3] += 1.0
    return video, audio, labels


def test_groups_see_a_mode_dropped_within_each_prompt():
    tv, ta, labels = two_spot_world(0, prompts=4, per_prompt=32, drop_mode=False)
    fresh_v, fresh_a, _ = two_spot_world(1, prompts=4, per_prompt=32, drop_mode=False)
    drop_v, drop_a, _ = two_spot_world(1, prompts=4, per_prompt=32, drop_mode=True)
    pooled = checkpoint_metrics(drop_v, drop_a, tv, ta)["score"]
    grouped = checkpoint_metrics(drop_v, drop_a, tv, ta, groups=labels)["score"]
    grouped_fresh = checkpoint_metrics(fresh_v, fresh_a, tv, ta, groups=labels)["score"]
    assert grouped > 5 * grouped_fresh and grouped > 3 * pooled, (grouped, grouped_fresh, pooled)
    one_group = checkpoint_metrics(drop_v, drop_a, tv, ta, groups=[7] * len(labels))
    assert one_group == checkpoint_metrics(drop_v, drop_a, tv, ta)


@pytest.mark.parametrize("groups, needle", [([0, 0, 1], "3 labels for 4 samples"), ([0, 0, 0, 1], "at least 2 samples")])
def test_bad_groups_are_named(groups, needle):
    video, audio = synthetic_world(0, **{**SHAPE, "n": 4})
    with pytest.raises(ValueError, match=needle):
        checkpoint_metrics(video, audio, video, audio, groups=groups)
