"""distill/pairs.py: each pair is the guided teacher's sample from the noise its key names, split by
mode into dataset directories the trainer's loader reads; a rerun adds nothing. (The trainer with
pairs: tests/test_train.py.)"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import toyworld as tw
from distill.data import PAIR, DataConfig, ShardBatches, pad_text, pair_noise
from distill.models import OviFusion, init_weights, variant_config
from distill.sampling import TeacherSamplerConfig, sample_teacher
from precompute.shards import iter_shard, read_index

REPO = tw.REPO


# The script as the GPU image runs it: that image has neither PyAV nor ftfy, and making pairs needs
# the ranks, not the encoders (session 17: the pairs stopped there on import)
WITHOUT_MEDIA_OR_TEXT_STACK = ("import runpy, sys; sys.modules['av'] = sys.modules['ftfy'] = None; "
                               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def make_pairs(data, out, *extra):
    return subprocess.run([sys.executable, "-c", WITHOUT_MEDIA_OR_TEXT_STACK, "distill/pairs.py", "--config",
                           "distill/configs/tiny.yaml", "--data", str(data), "--out", str(out), "--steps", "3",
                           "--dtype", "float32", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    tw.write_dataset(root / "data", tw.WorldConfig(), per_class=4)  # 16 clips, null prompts included
    proc = make_pairs(root / "data", root / "pairs", "--count", "6", "--batch-size", "3", "model.num_layers=3",
                      "data.i2v_ratio=0.5", "dmd.cfg_video=2.0", "dmd.cfg_audio=1.5", "dmd.slg_block=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_pairs_are_the_guided_teachers_samples_from_their_noise(toy_pairs):
    pairs = {mode: [s for shard in sorted((toy_pairs / "pairs" / mode / "shards").glob("*.tar")) for s in iter_shard(shard)]
             for mode in ("t2v", "i2v")}
    assert len(pairs["t2v"]) + len(pairs["i2v"]) == 6 and pairs["t2v"] and pairs["i2v"]
    first_keys = sorted(r.key for r in read_index(toy_pairs / "data" / "index.parquet"))[:6]
    assert sorted(s.key for ps in pairs.values() for s in ps) == first_keys      # the first 6 by key
    sources = {s.key: s for shard in (toy_pairs / "data" / "shards").glob("*.tar") for s in iter_shard(shard)}
    teacher = init_weights(OviFusion(variant_config("tiny", 3)), seed=0).eval()
    neg = torch.zeros(1, 32, 32)
    for mode, samples in pairs.items():
        pair = samples[0]
        settings = pair.meta.extra[PAIR]
        assert {k: settings[k] for k in ("mode", "steps", "cfg_video", "cfg_audio", "slg_block")} == \
            {"mode": mode, "steps": 3, "cfg_video": 2.0, "cfg_audio": 1.5, "slg_block": 1}
        source = sources[pair.key]
        assert torch.equal(pair.text_emb, source.text_emb)
        nv, na = pair_noise(settings["noise_seed"], tuple(source.video_latent.shape), tuple(source.audio_latent.shape))
        image = source.video_latent[None, :, :1].float() if mode == "i2v" else None
        cfg = TeacherSamplerConfig(steps=3, cfg_video=2.0, cfg_audio=1.5, slg_block=1)
        text = pad_text(source.text_emb.float(), 32, "prompt")[None]
        v, a = sample_teacher(teacher, nv[None], na[None], text, neg, neg, cfg, image)
        # batched there, one sample here; bf16 storage: a few bf16 steps apart at most (another noise: O(1))
        torch.testing.assert_close(pair.video_latent.float(), v[0], rtol=0.02, atol=0.02)
        torch.testing.assert_close(pair.audio_latent.float(), a[0], rtol=0.02, atol=0.02)
        if mode == "i2v":  # the image is the source's frame 0, kept
            assert torch.equal(pair.video_latent[:, :1], source.video_latent[:, :1])
    info = json.loads((toy_pairs / "pairs" / "t2v" / "dataset.json").read_text())
    assert info["counts"]["samples"] == len(pairs["t2v"]) and json.loads(info["encoders"][PAIR])["mode"] == "t2v"


def test_loader_gives_the_pairs_noise_and_target(toy_pairs):
    stream = ShardBatches(DataConfig(str(toy_pairs / "pairs" / "t2v"), batch_size=2, i2v_ratio=0.0, dtype="float32"))
    batch = next(stream)
    assert batch.has_pair and batch.image_latent is None
    samples = {s.key: s for shard in (toy_pairs / "pairs" / "t2v" / "shards").glob("*.tar") for s in iter_shard(shard)}
    for i, key in enumerate(batch.keys):
        s = samples[key]
        nv, na = pair_noise(s.meta.extra[PAIR]["noise_seed"], tuple(s.video_latent.shape), tuple(s.audio_latent.shape))
        assert torch.equal(batch.noise_video[i], nv) and torch.equal(batch.noise_audio[i], na)
        assert torch.equal(batch.target_video[i], s.video_latent.float()) and torch.equal(batch.video[i], batch.target_video[i])


def test_rerun_makes_nothing_new_and_bad_input_stops_first(toy_pairs, tmp_path):
    before = read_index(toy_pairs / "pairs" / "t2v" / "index.parquet")
    proc = make_pairs(toy_pairs / "data", toy_pairs / "pairs", "--count", "6", "--batch-size", "3", "model.num_layers=3",
                      "data.i2v_ratio=0.5", "dmd.cfg_video=2.0", "dmd.cfg_audio=1.5", "dmd.slg_block=1")
    assert proc.returncode == 0 and "(0 made" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert read_index(toy_pairs / "pairs" / "t2v" / "index.parquet") == before
    missing = make_pairs(tmp_path / "nope", tmp_path / "out")
    assert missing.returncode == 2 and "nope" in missing.stderr and not (tmp_path / "out").exists()
    bad = make_pairs(toy_pairs / "data", tmp_path / "out", "--count", "0")
    assert bad.returncode == 2 and "--count" in bad.stderr
