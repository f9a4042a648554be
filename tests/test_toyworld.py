"""bench/toyworld.py: the metrics against closed-form answers on synthetic Gaussians, the world's
own truth through the metrics, and (the CI gate) the whole pipeline at --size ci: the 4-step
DMD student must be closer to the world than the teacher run at 4 steps."""
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import toyworld as tw
from bench import toyworld_metrics as tm


# -- metrics: closed forms ------------------------------------------------------------------

def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 5 + 1 + 1
    assert tm.frechet_distance_gaussians(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_is_zero_for_equal_full_covariances_and_symmetric():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((4, 4))
    c1, c2 = m @ m.T + 0.1 * np.eye(4), np.diag([1.0, 2.0, 3.0, 4.0])
    mu = rng.standard_normal(4)
    assert tm.frechet_distance_gaussians(mu, c1, mu, c1) == pytest.approx(0.0, abs=1e-8)
    assert tm.frechet_distance_gaussians(mu, c1, 0 * mu, c2) == pytest.approx(
        tm.frechet_distance_gaussians(0 * mu, c2, mu, c1), rel=1e-8)


def test_frechet_distance_from_samples_converges_to_the_mean_shift():
    rng = np.random.default_rng(1)
    shift = np.array([1.0, 2.0])
    x, y = rng.standard_normal((20_000, 2)), rng.standard_normal((20_000, 2)) + shift
    assert tm.frechet_distance(x, y) == pytest.approx(5.0, abs=0.1)



def test_frechet_terms_split_the_distance_into_each_features_mean_and_the_covariance():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20_000, 3)) * np.array([1.0, 1.0, 2.0])  # feature 2: twice the spread
    y = rng.standard_normal((20_000, 3)) + np.array([0.0, 1.5, 0.0])   # feature 1: shifted by 1.5
    mean_terms, covariance = tm.frechet_terms(x, y)
    assert mean_terms.sum() + covariance == pytest.approx(tm.frechet_distance(x, y), abs=1e-9)
    assert mean_terms == pytest.approx([0.0, 2.25, 0.0], abs=0.05)
    assert covariance == pytest.approx((2.0 - 1.0) ** 2, abs=0.05)


def test_fd_to_truth_terms_sum_to_evaluates_fd():
    world = tw.WorldConfig(num_classes=2)
    samples = {"a draw": {k: tw.sample_world(world, np.full(64, k), 700 + k) for k in range(2)}}
    split = tw.fd_to_truth_terms(samples, world, truth_per_class=200, seed=5)["a draw"]
    total = sum(split["mean_terms"].values()) + split["covariance_term"]
    assert total == pytest.approx(tw.evaluate(samples, world, 200, seed=5)["a draw"]["fd_mean"], abs=1e-3)
    assert set(split["mean_terms"]) == {*tw.FEATURE_NAMES, "tone_0", "tone_1"}

def test_mean_pairwise_distance_of_a_gaussian():
    # x - y ~ N(0, 2σ²I₂): E|x - y| = σ·√π in two dimensions
    sigma = 0.5
    x = sigma * np.random.default_rng(2).standard_normal((3000, 2))
    assert tm.mean_pairwise_distance(x) == pytest.approx(sigma * math.sqrt(math.pi), rel=0.02)
    assert tm.diversity_ratio(x, 2 * x) == pytest.approx(0.5)


def test_mode_hits_and_coverage():
    modes = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    rng = np.random.default_rng(3)
    near_1 = modes[1] + rng.standard_normal((50, 2))
    assert tm.mode_hits(near_1, modes, 1) == 1.0 and tm.mode_hits(near_1, modes, 0) == 0.0
    half = np.concatenate([near_1[:25], modes[2] + rng.standard_normal((25, 2))])
    assert tm.mode_hits(half, modes, 1) == 0.5
    assert tm.mode_coverage([1.0, 0.5, 0.9]) == pytest.approx(2 / 3)  # 0.5 is not more than half


def test_onset_agreement_counts_within_tolerance():
    event = np.array([1, 2, 3, 4])
    onset = np.array([4, 9, 20, 17])                  # expected 4, 8, 13, 17 under floor(e * 22 / 5)
    assert tm.onset_agreement(event, onset, tw.audio_onset, tolerance=1.0) == 0.75


# -- the world --------------------------------------------------------------------------------

def test_world_features_recover_the_latent_truth_exactly():
    world = tw.WorldConfig()
    clips = tw.sample_world(world, np.repeat(np.arange(3), 50), seed=0)
    f = tw.features(clips["video"], clips["audio"], 3)
    event = clips["event"].numpy()
    np.testing.assert_allclose(f[:, tw.EVENT], event)
    np.testing.assert_allclose(f[:, tw.ONSET], tw.audio_onset(event))
    assert set(np.unique(event)) == {1, 2, 3, 4}
    # the tone channels name the class
    assert (f[:, 6:].argmax(axis=1) == clips["content"].numpy()).all()


def test_world_is_seeded_and_null_prompt_draws_every_class():
    world = tw.WorldConfig()
    a = tw.sample_world(world, np.full(300, tw.NULL_CLASS), seed=5)
    b = tw.sample_world(world, np.full(300, tw.NULL_CLASS), seed=5)
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    assert set(a["content"].tolist()) == {0, 1, 2}


def test_object_sits_at_one_of_its_class_spots_and_uses_them_all():
    world = tw.WorldConfig(spots=4, position_jitter=0.05)
    clips = tw.sample_world(world, np.full(400, 1), seed=3)
    spots = tw.class_positions(world)[1]                                   # [4, 2]
    distance = np.linalg.norm(clips["position"].numpy()[:, None] - spots[None], axis=-1)
    assert distance.min(axis=1).max() < 0.3                                # every clip at a spot
    assert set(distance.argmin(axis=1).tolist()) == {0, 1, 2, 3}           # and every spot used
    # spots are evenly spread on the class circle: 2 spots sit on opposite sides of the centre
    two = tw.class_positions(tw.WorldConfig(spots=2))
    np.testing.assert_allclose(two[:, 0] + two[:, 1], np.full((3, 2), 2 * 1.5), atol=1e-12)  # centre (1.5, 1.5)
    # one spot: every clip sits at its class's single position, within the jitter
    one = tw.sample_world(tw.WorldConfig(spots=1), np.arange(3), seed=0)
    jitter = one["position"].numpy() - tw.class_positions(tw.WorldConfig(spots=1))[:, 0]
    assert np.abs(jitter).max() < 4 * tw.WorldConfig().position_jitter
    with pytest.raises(ValueError, match="spots"):
        tw.WorldConfig(spots=0)


def test_dataset_shards_are_not_sorted_by_class(tmp_path):
    """The loader reads one shard at a time through a 16-sample shuffle buffer: class-sorted shards
    would make every batch one class (the first ci teacher learnt from such batches)."""
    from precompute.shards import iter_shard
    world = tw.WorldConfig()
    tw.write_dataset(tmp_path, world, per_class=32)
    shards = sorted((tmp_path / "shards").rglob("*.tar"))
    first = [s.meta.extra["class"] for s in iter_shard(shards[0])][:16]
    assert len(set(first)) == world.num_classes + 1, first                 # every class and the null prompt


def fake_samples(world, n, transform=lambda clips: clips, seed=99):
    out = {}
    for k in range(world.num_classes):
        clips = transform(tw.sample_world(world, np.full(n, k), seed + k))
        out[k] = {"video": clips["video"], "audio": clips["audio"]}
    return out


def test_evaluate_separates_truth_from_blur_and_collapse():
    world = tw.WorldConfig()
    n = 64

    def blur(clips):  # the mean of two draws: what a few-step sampler's averaging looks like
        other = tw.sample_world(world, clips["content"].numpy(), seed=1234)
        return {"video": (clips["video"] + other["video"]) / 2, "audio": (clips["audio"] + other["audio"]) / 2}

    def collapse(clips):  # one sample repeated: no diversity
        return {"video": clips["video"][:1].expand_as(clips["video"]).clone(),
                "audio": clips["audio"][:1].expand_as(clips["audio"]).clone()}

    samples = {"truth": fake_samples(world, n), "blur": fake_samples(world, n, blur),
               "collapse": fake_samples(world, n, collapse)}
    r = tw.evaluate(samples, world, truth_per_class=500)
    assert r["truth"]["mode_coverage"] == 1.0 and r["truth"]["onset_agreement"] == 1.0
    assert 0.8 < r["truth"]["diversity_ratio"] < 1.2
    assert r["truth"]["fd_mean"] < 0.5 * r["blur"]["fd_mean"]
    assert r["truth"]["fd_mean"] < 0.5 * r["collapse"]["fd_mean"]
    assert r["collapse"]["diversity_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert np.allclose(r["collapse"]["spread_per_feature"], 0.0, atol=1e-3)
    assert all(0.7 < x < 1.4 for x in r["truth"]["spread_per_feature"]), r["truth"]["spread_per_feature"]
    table = tw.markdown_table(r)
    rows = [name for name, v in r.items() if "fd_mean" in v]
    assert rows == ["truth (fresh draw)", "truth", "blur", "collapse"]
    assert table.count("\n") == 1 + len(rows) and "FD mean" in table


def _row(fd, coverage=1.0, hits=(1.0, 1.0), onset=0.5, diversity=1.0, fd_ref=None):
    return {"fd_mean": fd, "mode_coverage": coverage, "mode_hits": list(hits), "onset_agreement": onset,
            "diversity_ratio": diversity, **({} if fd_ref is None else {"fd_ref_mean": fd_ref})}


def test_criteria_judge_by_the_truth_without_guidance_and_by_teacher50_with_it():
    results = {"teacher@50": _row(4.0, fd_ref=0.0), "teacher@4": _row(6.0, fd_ref=2.0),
               "student@4": _row(2.9, diversity=0.84, fd_ref=2.5)}
    unguided = tw.criteria(results, cfg=1.0)
    assert unguided["fd_mean vs teacher@50"]["bound"] == pytest.approx(5.0)          # 1.25x, the worst-seed bar
    assert unguided["fd_mean vs teacher@4"] == {"student": 2.9, "bound": 6.0, "ok": True, "op": "<"}
    assert unguided["diversity_ratio vs teacher@50"]["ok"]                          # 0.84 >= 1.0 / 1.2
    guided = tw.criteria(results, cfg=2.0)
    assert "fd_mean vs teacher@4" not in guided                                      # the truth does not judge it
    assert guided["fd_ref_mean vs teacher@4"] == {"student": 2.5, "bound": 2.0, "ok": False, "op": "<"}
    results["student@4"] = _row(3.1, hits=(1.0, 0.5), diversity=0.8, fd_ref=1.0)
    failed = {name for name, c in tw.criteria(results, cfg=1.0).items() if not c["ok"]}
    assert failed == {"diversity_ratio vs teacher@50", "mode_hits_mean vs teacher@50"}
    assert tw.criteria_lines(tw.criteria(results, cfg=1.0)).count("FAIL") == 2


def test_drift_check_compares_the_last_snapshot_with_the_recipes_student():
    results = {"teacher@50": _row(4.0, fd_ref=0.0), "teacher@4": _row(6.0, fd_ref=2.0), "student@4": _row(3.0, fd_ref=1.0),
               "student@4, DMD step 150": _row(3.5, fd_ref=1.4), "student@4, DMD step 450": _row(3.1, fd_ref=1.04),
               "student@4, DMD step 600": _row(3.2, fd_ref=1.06)}
    assert tw.drift_pair(results, 300) == ("student@4", "student@4, DMD step 600")
    assert tw.drift_pair(results, 600) is None                                        # nothing past the recipe
    guided = tw.criteria(results, cfg=3.0, recipe_step=300)
    assert guided["fd_ref_mean at DMD step 600 vs the recipe's"] == {"student": 1.06, "bound": pytest.approx(1.05),
                                                                     "ok": False, "op": "<="}
    unguided = tw.criteria(results, cfg=1.0, recipe_step=300)
    assert unguided["fd_mean at DMD step 600 vs the recipe's"]["ok"] is False         # 3.2 > 1.05 * 3.0


def test_sweep_verdict_applies_the_issue_bars_over_seeds():
    from bench.toyworld_sweep import spearman, verdict
    row = lambda student, t50, t4, s_ref, t4_ref, ok=True: {"student": student, "teacher@50": t50, "teacher@4": t4,
                                                           "student to t50": s_ref, "teacher@4 to t50": t4_ref,
                                                           "run_criteria_ok": ok}
    unguided = verdict([row(1.0, 1.0, 2.0, 0, 1), row(1.2, 1.0, 1.5, 0, 1), row(0.9, 1.0, 1.4, 0, 1)], cfg=1.0)
    assert unguided["mean FD: student / teacher@50 <= 1.1"] == {"value": pytest.approx(31 / 30), "bound": 1.1, "ok": True}
    assert unguided["worst seed FD: student / teacher@50 <= 1.25"]["value"] == pytest.approx(1.2)
    assert unguided["mean FD: student / teacher@4 <= 0.8"]["value"] == pytest.approx(3.1 / 4.9)
    assert unguided["worst seed FD: student / teacher@4 < 1"]["value"] == pytest.approx(0.8)   # 1.2 / 1.5
    guided = verdict([row(1.0, 1.0, 2.0, 0.4, 1.0), row(1.0, 1.0, 2.0, 0.9, 1.0, ok=False)], cfg=2.0)
    assert guided["mean FD to t50: student / teacher@4 <= 0.5"]["value"] == pytest.approx(0.65)
    assert guided["worst seed FD to t50: student / teacher@4 < 1"]["ok"]
    assert guided["every run's own criteria (modes, onset, diversity, drift)"]["value"] == 1.0
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0) and spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_sweep_table_reads_each_run_and_shows_the_onset_draws(tmp_path):
    from bench.toyworld_sweep import main, markdown, run_dir, summarise
    sampler = lambda fd, ref, onset: {"fd_mean": fd, "fd_ref_mean": ref, "onset_agreement": onset}
    results = {"teacher@50": sampler(5.0, 0.0, 0.70), "teacher@50 (2nd draw)": sampler(5.1, 0.3, 0.58),
               "teacher@4": sampler(9.0, 2.0, 0.60), "undistilled@4": sampler(8.0, 1.5, 0.50),
               "undistilled guided@4": sampler(6.0, 1.2, 0.50),
               "student@4": sampler(5.2, 0.4, 0.57), "student@4, DMD step 400": sampler(5.1, 0.35, 0.60)}
    report = {"results": results, "config": {"dmd_steps": 200},
              "criteria": {"onset_agreement vs teacher@50": {"ok": False}, "fd_mean vs teacher@50": {"ok": True}}}
    summary = summarise({(7, 2.0): report}, seeds=[7, 8], cfgs=[2.0])
    setting = summary["settings"]["2"]
    assert setting["missing_seeds"] == [8]
    (row,) = setting["rows"]
    assert row["onset"] == {"student@4": 0.57, "teacher@50": 0.70, "teacher@50 (2nd draw)": 0.58}
    assert row["snapshots"] == {"student@4": 0.4, "student@4, DMD step 400": 0.35}
    assert row["init to t50"] == 1.2   # DMD starts from the fine-tuned model when there is one
    assert row["failed_criteria"] == ["onset_agreement vs teacher@50"] and not row["run_criteria_ok"]
    assert "| 0.57 / 0.70 / 0.58 | fail: onset_agreement vs teacher@50 |" in markdown(summary)
    # the judge's own spread: the second teacher@50 draw is 5.1 / 5.0 of the first against the truth
    assert row["teacher@50 again"] == 5.1 and setting["judge_spread"]["per_seed"] == [pytest.approx(1.02)]
    assert "| 7 | 5.000 | 5.100 | 9.000 |" in markdown(summary) and "up to 2.0% off on one seed" in markdown(summary)
    assert setting["target"] is None and "DMD's target" not in markdown(summary)   # no fine-tune in this run
    # with a fine-tune: the guided bar as a student exactly at its target would score it
    guided = {**report, "results": {**results, "guided@50": sampler(5.3, 1.0, 0.45)}}
    target = summarise({(7, 2.0): guided}, seeds=[7], cfgs=[2.0])["settings"]["2"]["target"]
    assert target == {"mean_ratio": 0.5, "below_teacher4": 1, "onset": {7: 0.45}}
    assert summarise({(7, 1.0): guided}, seeds=[7], cfgs=[1.0])["settings"]["1"]["target"] is None
    # --table-only: the same table from the runs already in OUT, nothing trained
    run_dir(tmp_path, 7, 2.0).mkdir()
    (run_dir(tmp_path, 7, 2.0) / "results.json").write_text(json.dumps(report))
    assert main(["--size", "ci", "--seeds", "7", "8", "--cfgs", "2", "--out", str(tmp_path), "--table-only"]) == 0
    assert (tmp_path / "sweep.md").read_text() == markdown(summary) + "\n"


def test_evaluator_rules_rank_snapshots_by_each_metric_against_the_judge(tmp_path, capsys):
    """bench/evaluator_rules.py: a metric that tracks the judge picks its best on every run (Spearman 1),
    one that runs against it never does; ratios count by |log ratio|; runs without snapshots are skipped;
    the latest snapshot is the baseline beside them."""
    from bench.evaluator_rules import LATEST, main
    for seed, judge in ((1, [0.9, 0.5, 0.7]), (2, [0.4, 0.8, 0.6])):
        names = ["student@4, DMD step 200", "student@4", "student@4, DMD step 600"]
        results = {name: {"fd_ref_mean": fd, "fd_mean": 9.0, "evaluator": {
                       "score": 1.0 - fd, "fd_video": fd / 10, "diversity_audio": math.exp(-fd),   # |log| = fd
                       "av_sync_student": 0.3, "av_sync_teacher": 0.5}}
                   for name, fd in zip(names, judge)}
        run = tmp_path / f"seed{seed}_cfg2"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"config": {"cfg": 2.0, "seed": seed, "dmd_steps": 400}, "results": results}))
    (tmp_path / "seed3_cfg2").mkdir()   # a run without snapshots
    (tmp_path / "seed3_cfg2" / "results.json").write_text(json.dumps({"config": {"cfg": 2.0, "seed": 3, "dmd_steps": 400}, "results": {
        "student@4": {"fd_ref_mean": 0.5, "evaluator": {"score": 0.1}}}}))
    out = tmp_path / "rules.json"
    assert main([str(tmp_path), "--json", str(out)]) == 0
    rules = json.loads(out.read_text())["rules"]
    assert set(rules) == {"score", "fd_video", "diversity_audio", LATEST}   # one-sided metrics are not rules
    for rule in ("fd_video", "diversity_audio"):
        assert all(r["within_5pct"] for r in rules[rule]["runs"]) and rules[rule]["mean_spearman"] == pytest.approx(1.0)
    assert not any(r["within_5pct"] for r in rules["score"]["runs"]) and rules["score"]["mean_spearman"] == pytest.approx(-1.0)
    # the latest snapshot (step 600) is the judge's best on neither run; its ranking by step: 0.5 and -0.5
    assert [r["picked"] for r in rules[LATEST]["runs"]] == ["student@4, DMD step 600"] * 2
    assert [r["spearman"] for r in rules[LATEST]["runs"]] == pytest.approx([0.5, -0.5])
    assert "| fd_video | 2 of 2 | 1.00 |" in capsys.readouterr().out
    assert main([str(tmp_path / "seed3_cfg2")]) == 2


def test_runner_subprocess_keeps_the_callers_pythonpath(monkeypatch):
    # the GPU image's DeepSpeed lives in a `pip --target` folder on PYTHONPATH; replacing PYTHONPATH
    # with the repo made every toy run's launcher fail there (ModuleNotFoundError: deepspeed)
    from bench.launching import pythonpath_with
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/opt/site", "/opt/other"]))
    assert pythonpath_with(Path("/repo")).split(os.pathsep) == ["/repo", "/opt/site", "/opt/other"]
    monkeypatch.delenv("PYTHONPATH")
    assert pythonpath_with(Path("/repo")) == "/repo"


def test_size_overrides_parse_literals_and_reject_unknown_fields():
    size = tw.with_overrides(tw.SIZES["gpu"], ["cfg=1.5", "dmd_steps=10", "student_sigmas=(1.0, 0.5)"])
    assert (size.cfg, size.dmd_steps, size.student_sigmas) == (1.5, 10, (1.0, 0.5))
    assert size.flow_steps == tw.SIZES["gpu"].flow_steps
    with pytest.raises(SystemExit, match="no_such_field"):
        tw.with_overrides(tw.SIZES["gpu"], ["no_such_field=1"])
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        tw.with_overrides(tw.SIZES["gpu"], ["cfg"])
    assert tw.with_overrides(tw.SIZES["gpu"], ["renoise=fresh"]).renoise == "fresh"  # a bare word stays a string
    world = tw.with_overrides(tw.SIZES["ci"], ["world.spots=2", "world.noise_std=0.05"]).world
    assert (world.spots, world.noise_std, world.num_classes) == (2, 0.05, tw.SIZES["ci"].world.num_classes)
    with pytest.raises(SystemExit, match="spots must be >= 1"):
        tw.with_overrides(tw.SIZES["ci"], ["world.spots=0"])
    with pytest.raises(SystemExit, match="world.no_such_field"):
        tw.with_overrides(tw.SIZES["ci"], ["world.no_such_field=1"])
    with pytest.raises(SystemExit, match="renoise must be one of"):
        tw.with_overrides(tw.SIZES["gpu"], ["renoise=ode"])
    # the snapshots are checkpoints every dmd_steps / dmd_snapshots: a remainder would leave the
    # exporter looking for a step that was never saved, after the whole run
    with pytest.raises(SystemExit, match="dmd_snapshots=3 must divide dmd_steps=400"):
        tw.with_overrides(tw.SIZES["gpu"], ["dmd_steps=400", "dmd_snapshots=3"])



def test_the_decay_span_reaches_the_trainer_and_the_floor_holds_after_it(tmp_path):
    # session 25's students at twice the steps decayed over the first dmd_steps and held the floors
    # after; lr_decay_steps trains that schedule as a recipe of its own (dmd_steps=1600, decay 800)
    from distill.config import load_config
    from distill.schedules import lr_factor
    teacher = tmp_path / "teacher.safetensors"
    teacher.touch()  # the config checks that the file is there; nothing loads it
    size = tw.with_overrides(tw.SIZES["gpu"], ["dmd_steps=1600", "lr_decay_steps=800"])
    cfg = load_config("distill/configs/tiny.yaml", tw.dmd_overrides(size, teacher, None, "samples"))
    for optim, floor in ((cfg.generator_optim, size.generator_floor), (cfg.critic_optim, size.lr_min_ratio)):
        assert optim.schedule.decay_steps == 800
        assert lr_factor(optim.schedule, 400, size.train_steps) == pytest.approx((1 + floor) / 2)
        assert lr_factor(optim.schedule, 800, size.train_steps) == lr_factor(optim.schedule, 1599, size.train_steps) == pytest.approx(floor)
    default = load_config("distill/configs/tiny.yaml", tw.dmd_overrides(tw.SIZES["gpu"], teacher, None, "samples"))
    assert default.generator_optim.schedule.decay_steps == tw.SIZES["gpu"].dmd_steps  # None: over dmd_steps
    with pytest.raises(SystemExit, match="lr_decay_steps must be None or in"):
        tw.with_overrides(tw.SIZES["gpu"], ["lr_decay_steps=1601", "dmd_steps=1600"])


def test_stage_2_runs_where_there_is_guidance_and_at_cfg1_only_where_the_size_says():
    # the gpu size skips stage 2 without guidance (session 25: DMD against the teacher itself met CFG 1's
    # bars there, its fine-tunes' students did not); the ci size keeps it at every CFG
    gpu, ci = tw.SIZES["gpu"], tw.SIZES["ci"]
    assert [tw.with_overrides(gpu, [f"cfg={c}"]).runs_stage2 for c in (1.0, 2.0, 3.0)] == [False, True, True]
    assert [tw.with_overrides(ci, [f"cfg={c}"]).runs_stage2 for c in (1.0, 2.0)] == [True, True]
    assert not tw.with_overrides(gpu, ["cfg=2.0", "guided_steps=0"]).runs_stage2

# -- the CI gate: the whole pipeline at --size ci ----------------------------------------------

def test_ci_size_guided_student_beats_the_teacher_at_four_steps(tmp_path):
    """Shards -> flow teacher -> teacher pairs (CFG 2, SLG) -> the teacher fine-tuned on them -> DMD
    student from it, all through distill/ under the real DeepSpeed launcher; then every sampler
    against fresh world draws and against teacher@50's own samples, which is what a guided student
    must match."""
    size = tw.SIZES["ci"]
    assert size.cfg >= 2 and size.slg_block is not None, "the CI gate runs with guidance"
    assert size.guided_steps > 0, "the CI gate runs the recipe: DMD against the guided samples' score"
    report = tw.run("ci", tmp_path / "toyworld")
    r = report["results"]
    floor, t50, t4, s4 = r["truth (fresh draw)"], r["teacher@50"], r["teacher@4"], r["student@4"]
    undistilled, t50_again = r["undistilled@4"], r["teacher@50 (2nd draw)"]
    print("\n" + report["table"])
    for row in (floor, t50, t4, undistilled, s4):
        assert all(math.isfinite(x) for x in row["fd_per_class"]), row
    # the metrics see the world: an independent truth draw is close to the reference
    assert floor["fd_mean"] < 0.5 and floor["mode_coverage"] == 1.0 and floor["onset_agreement"] > 0.95
    # teacher@50 from other noise is closer to teacher@50 than its own 4-step solver (else no baseline)
    assert t50_again["fd_ref_mean"] < t4["fd_ref_mean"], report["table"]
    # the gate: the student is closer to the guided teacher's samples than the teacher's own 4 steps ...
    assert s4["fd_ref_mean"] < t4["fd_ref_mean"], report["table"]
    # ... and it is DMD that does it, not the student's sampler: the same sampler with the teacher's
    # weights, and with the fine-tuned weights where DMD starts, is farther
    assert s4["fd_ref_mean"] < undistilled["fd_ref_mean"], report["table"]
    assert s4["fd_ref_mean"] < r["undistilled guided@4"]["fd_ref_mean"], report["table"]
    # the fine-tune (DMD's target, exported as its EMA) lands nearer teacher@50's samples than the
    # teacher's own 4 steps: else the student would chase something worse than its baseline
    assert r["guided@50"]["fd_ref_mean"] < t4["fd_ref_mean"], report["table"]
    # ... without collapsing: samples land on their own class's mode about as often as under
    # teacher@4 (mean hit rate; coverage moves in steps of 1/K) and stay diverse
    assert np.mean(s4["mode_hits"]) >= np.mean(t4["mode_hits"]) - 0.05, report["table"]
    assert s4["diversity_ratio"] > 0.5, report["table"]
    assert math.isfinite(s4["evaluator"]["score"])                   # distill/eval_metrics.py on every sampler
    assert (tmp_path / "toyworld" / "results.json").is_file()
    assert (tmp_path / "toyworld" / "pairs" / "t2v" / "index.parquet").is_file()
    # the saved samples are what was measured: re-evaluated, they give the report's numbers
    saved = torch.load(tmp_path / "toyworld" / "samples.pt")
    again = tw.evaluate(saved, size.world, size.truth_per_class)
    assert again["student@4"]["fd_ref_mean"] == pytest.approx(s4["fd_ref_mean"], rel=1e-6)
    assert again["teacher@50"]["fd_mean"] == pytest.approx(t50["fd_mean"], rel=1e-6)

    # --teacher: distil that teacher again, no flow training (a few DMD steps, a small evaluation)
    teacher = tmp_path / "toyworld" / "teacher.safetensors"
    quick = dataclasses.replace(size, train_per_class=16, dmd_steps=4, eval_per_class=8, truth_per_class=50, pairs=16,
                                batch_size=8)
    again = tw.run("ci", tmp_path / "again", quick, teacher=teacher)
    assert again["teacher"] == str(teacher) and not (tmp_path / "again" / "teacher_run").exists()
    assert (tmp_path / "again" / "student.safetensors").is_file() and "student@4" in again["results"]

    # bench/toyworld_redraw.py: the run's own noise gives back its numbers; other noise, other numbers
    from bench.toyworld_redraw import redraw, resample
    own, other = resample(tmp_path / "again", [quick.seeded(7), quick.seeded(7) + 100_000], torch.device("cpu"))
    for name in ("teacher@4", "student@4", "student@4, DMD step 2"):
        assert own[name]["fd_ref_mean"] == pytest.approx(again["results"][name]["fd_ref_mean"], rel=1e-6), name
        assert own[name]["fd_mean"] == pytest.approx(again["results"][name]["fd_mean"], rel=1e-6), name
    assert other["student@4"]["fd_ref_mean"] != pytest.approx(own["student@4"]["fd_ref_mean"], rel=1e-3)
    draws = redraw(tmp_path / "again", 1, torch.device("cpu"))["draws"]
    assert len(draws) == 2 and draws[0]["student / teacher@4 (fd_ref_mean)"] == pytest.approx(
        again["results"]["student@4"]["fd_ref_mean"] / again["results"]["teacher@4"]["fd_ref_mean"])

    # bench/toyworld_redmd.py: the DMD stage again with a trainer override, from the run's fine-tune,
    # with the regression anchor on the run's own pairs beside DMD (--set regression_weight); its
    # samplers other than the students are the run's own (same noise), both changes took
    from bench.toyworld_redmd import redmd
    changed = redmd(tmp_path / "again", tmp_path / "redmd", ["regression_weight=1.0"], ["dmd.critic_ratio=2", "log.every=1"],
                    torch.device("cpu"))["distances"]
    assert set(changed) >= {"DMD step 2", "DMD step 4", "guided@50", "teacher@4"}
    assert changed["guided@50"]["to_t50"] == pytest.approx(again["results"]["guided@50"]["fd_ref_mean"], rel=1e-6)
    assert changed["guided@50"]["to_guided50"] == pytest.approx(0.0, abs=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "redmd" / "student_run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "generator/grad_norm" in r] == [0, 2]
    assert all(any("regression_video" in k for k in r) for r in rows if "generator/grad_norm" in r), rows[0]
    # --measure: the run's own students from its samples.pt, the same distances, no training; the one
    # to teacher@50's other-noise draw is its distance to that draw (zero for the draw itself)
    from bench.toyworld_redmd import measure
    measured = measure(tmp_path / "again", tmp_path / "measured", torch.device("cpu"))
    own = measured["distances"]
    assert own["student@4"]["to_t50"] == pytest.approx(again["results"]["student@4"]["fd_ref_mean"], rel=1e-6)
    assert own["student@4"]["to_truth"] == pytest.approx(again["results"]["student@4"]["fd_mean"], rel=1e-6)
    assert own["guided@50"]["to_guided50"] == pytest.approx(0.0, abs=1e-6) and own["student@4"]["to_guided50"] > 0
    assert own[tw.REFERENCE_FLOOR]["to_t50_other_noise"] == pytest.approx(0.0, abs=1e-6)
    assert own[tw.REFERENCE_FLOOR]["to_t50"] == pytest.approx(again["results"][tw.REFERENCE_FLOOR]["fd_ref_mean"], rel=1e-6)
    assert own["student@4"]["to_t50_other_noise"] > 0
    split = measured["fd_to_truth_terms"]["student@4"]  # which features the distance to the truth is
    assert sum(split["mean_terms"].values()) + split["covariance_term"] == pytest.approx(own["student@4"]["to_truth"], abs=1e-3)
    # stage 2's gap: the fine-tune's distance to teacher@50's samples over its start's (the teacher
    # sampled without guidance), by the judge and by the evaluator's score
    gap = measured["stage2"]
    assert gap["start_to_t50"] > 0 and gap["start_score"] > 0
    assert gap["guided@50"]["to_t50"] == pytest.approx(own["guided@50"]["to_t50"], rel=1e-5)   # sampled again, the same
    assert gap["guided@50"]["judge_gap_closed"] == pytest.approx(1 - gap["guided@50"]["to_t50"] / gap["start_to_t50"])
    assert gap["guided@50"]["evaluator_gap_closed"] == pytest.approx(1 - gap["guided@50"]["score"] / gap["start_score"])
    # --fine-tune: stage 2 again (two steps here), measured beside the run's own fine-tune and teacher@50
    from bench.toyworld_redmd import refine_tune
    refined = refine_tune(tmp_path / "again", tmp_path / "refined", ["guided_steps=2"], ["log.every=1"], torch.device("cpu"))
    stage2 = refined["distances"]
    assert set(refined["stage2"]) == {"start_to_t50", "start_score", "guided@50", "guided@50, changed"}
    assert refined["stage2"]["start_to_t50"] == pytest.approx(gap["start_to_t50"], rel=1e-6)   # the same teacher, noise
    assert stage2["guided@50"]["to_t50"] == pytest.approx(again["results"]["guided@50"]["fd_ref_mean"], rel=1e-6)
    assert stage2["guided@50, changed"]["to_guided50"] > 0 and math.isfinite(stage2["guided@50, changed"]["to_t50"])
    # one sampling of the changed fine-tune serves both: its distances and stage 2's gap
    assert refined["stage2"]["guided@50, changed"]["to_t50"] == pytest.approx(stage2["guided@50, changed"]["to_t50"], rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "refined" / "guided_run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 1 and (tmp_path / "refined" / "refine_tune.json").is_file()
    assert (tmp_path / "measured" / "measure.json").is_file()


def test_a_runs_size_reads_back_from_its_results_json():
    for size in tw.SIZES.values():
        assert tw.size_from_config(json.loads(json.dumps(dataclasses.asdict(size)))) == size


def test_redraw_names_a_run_without_its_exports(tmp_path):
    from bench.toyworld_redraw import main
    with pytest.raises(SystemExit, match="no results.json"):
        main([str(tmp_path)])
    report = {"config": dataclasses.asdict(tw.SIZES["ci"]), "teacher": "trained by this run", "results": {}}
    (tmp_path / "results.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=r"exports are gone \(.*student.safetensors"):
        main([str(tmp_path)])


def test_teacher_of_another_depth_stops_before_any_work(tmp_path):
    from distill.models import OviFusion, variant_config
    from distill.models.loading import save_ovi_checkpoint
    two_layers = save_ovi_checkpoint(OviFusion(variant_config("tiny", 2)).state_dict(), tmp_path / "t2.safetensors")
    with pytest.raises(SystemExit, match=r"not a teacher of this size \(3 layers\).*missing"):
        tw.main(["--size", "ci", "--out", str(tmp_path / "out"), "--teacher", str(two_layers)])
    with pytest.raises(SystemExit, match="no such checkpoint file"):
        tw.main(["--size", "ci", "--out", str(tmp_path / "out"), "--teacher", str(tmp_path / "none.safetensors")])
    assert not (tmp_path / "out").exists()
