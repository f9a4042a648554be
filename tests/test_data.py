"""distill/data.py on real tar shards written by precompute/shards.py: single-bucket batches,
rank splitting, bit-exact resume, i2v, and corrupt data skipped and counted."""
import dataclasses
import json
import tarfile
from pathlib import Path

import pytest
import torch

from distill.config import TrainConfig
from distill.data import DataConfig, DataError, ShardBatches, build_loader, check_dataset, plan_epoch
from precompute.shards import (
    LATENTS_MEMBER,
    DatasetInfo,
    Negatives,
    Sample,
    SampleMeta,
    ShardWriter,
    read_done_rows,
    sample_key,
    write_dataset_info,
    write_index,
    write_negatives,
)
from precompute.variants import get_variant

TINY = get_variant("tiny")  # text_len 32
TEXT_DIM = 8
BUCKETS = [(64, 64)] * 12 + [(64, 96)] * 6  # two buckets; maxcount 4 -> shards of 4,4,4 and 4,2


def make_sample(i: int, bucket: tuple[int, int]) -> Sample:
    g = torch.Generator().manual_seed(i)
    n_tokens = 3 + i % 7
    meta = SampleMeta(prompt=f"clip {i}", source=f"/videos/{i}.mp4", t0=float(i), t1=i + TINY.duration_s,
                      source_fps=24.0, source_size=(64, 96), bucket=bucket, variant="tiny")
    return Sample(
        key=sample_key(meta.source, meta.t0, "tiny"),
        video_latent=torch.randn(48, TINY.latent_frames, bucket[0] // 16, bucket[1] // 16, generator=g).bfloat16(),
        audio_latent=torch.randn(TINY.audio_latents, 20, generator=g).bfloat16(),
        text_emb=torch.randn(n_tokens, TEXT_DIM, generator=g).bfloat16(),
        text_ids=torch.arange(n_tokens, dtype=torch.int32),
        meta=meta,
    )


def write_dataset(root: Path, normalised: bool = True) -> dict[str, Sample]:
    samples = [make_sample(i, bucket) for i, bucket in enumerate(BUCKETS)]
    with ShardWriter(root, rank=0, maxcount=4) as writer:
        for s in samples:
            writer.write(s)
    write_index(root / "index.parquet", read_done_rows(root))
    write_negatives(root / "negatives.safetensors", Negatives(
        "blurry", torch.randn(5, TEXT_DIM).bfloat16(), torch.arange(5, dtype=torch.int32),
        "muffled", torch.randn(4, TEXT_DIM).bfloat16(), torch.arange(4, dtype=torch.int32)))
    write_dataset_info(root / "dataset.json", DatasetInfo(
        variant="tiny", video_latent_normalised=normalised, video_latent_mean=tuple(0.01 * c for c in range(48)),
        video_latent_std=tuple(0.5 + 0.01 * c for c in range(48)), encoders={}, counts={"samples": len(samples)}))
    return {s.key: s for s in samples}


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict[str, Sample]]:
    return tmp_path, write_dataset(tmp_path)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys == b.keys
    for name in ("video", "audio", "text", "neg_text_video", "neg_text_audio"):
        assert torch.equal(bits(getattr(a, name)), bits(getattr(b, name))), name
    assert (a.image_latent is None) == (b.image_latent is None)
    if a.image_latent is not None:
        assert torch.equal(bits(a.image_latent), bits(b.image_latent))


def test_batches_are_single_bucket_with_padded_text(dataset):
    root, samples = dataset
    loader = ShardBatches(DataConfig(str(root), batch_size=3, i2v_ratio=0.0))
    negatives = loader.dataset.negatives
    for batch in take(loader, 12):
        assert batch.size == 3 and len(set(batch.keys)) == 3 and batch.image_latent is None
        widths = {samples[k].video_latent.shape[-1] for k in batch.keys}
        assert len(widths) == 1
        assert batch.video.shape == (3, 48, TINY.latent_frames, 4, widths.pop())
        assert batch.audio.shape == (3, TINY.audio_latents, 20)
        assert batch.text.shape == batch.neg_text_video.shape == batch.neg_text_audio.shape == (3, 32, TEXT_DIM)
        assert {t.dtype for t in (batch.video, batch.audio, batch.text, batch.neg_text_audio)} == {torch.bfloat16}
        for row, key in enumerate(batch.keys):
            s = samples[key]
            n = s.text_emb.shape[0]
            assert torch.equal(bits(batch.video[row]), bits(s.video_latent))  # stored normalised: untouched
            assert torch.equal(bits(batch.audio[row]), bits(s.audio_latent))
            assert torch.equal(bits(batch.text[row, :n]), bits(s.text_emb))
            assert not batch.text[row, n:].any()
            assert torch.equal(bits(batch.neg_text_video[row, :5]), bits(negatives.video_emb))
            assert not batch.neg_text_video[row, 5:].any() and not batch.neg_text_audio[row, 4:].any()


def test_raw_video_latents_are_normalised_at_load(tmp_path):
    samples = write_dataset(tmp_path, normalised=False)
    loader = ShardBatches(DataConfig(str(tmp_path), batch_size=2, dtype="float32", i2v_ratio=1.0))
    batch = next(loader)
    info = loader.dataset.info
    mean = torch.tensor(info.video_latent_mean).view(48, 1, 1, 1)
    std = torch.tensor(info.video_latent_std).view(48, 1, 1, 1)
    expected = torch.stack([(samples[k].video_latent.float() - mean) / std for k in batch.keys])
    assert batch.video.dtype == torch.float32 and torch.equal(batch.video, expected)
    assert torch.equal(batch.image_latent, expected[:, :, :1])


def first_epoch_keys(root, rank, world):
    loader = ShardBatches(DataConfig(str(root), batch_size=1, shuffle_buffer=0), rank=rank, world_size=world)
    keys = []
    while True:
        batch = next(loader)
        if loader.state.epoch != 0:
            return keys
        keys += batch.keys


@pytest.mark.parametrize("world", [2, 7])  # 5 shards: shard-level split, then sample-level striding
def test_ranks_cover_an_epoch_without_overlap(dataset, world):
    root, samples = dataset
    per_rank = [first_epoch_keys(root, rank, world) for rank in range(world)]
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) and set(flat) == set(samples)
    assert all(per_rank)
    stride = plan_epoch(tuple(f"s{i}" for i in range(5)), 0, 0, 0, world).stride
    assert stride == (1 if world <= 5 else world)


def test_epochs_reshuffle_the_shards():
    shards = tuple(f"shards/0-{i:06d}.tar" for i in range(20))
    orders = {plan_epoch(shards, 3, epoch, 0, 1).shards for epoch in range(4)}
    assert len(orders) == 4 and all(sorted(o) == list(shards) for o in orders)
    assert plan_epoch(shards, 3, 1, 0, 1) == plan_epoch(shards, 3, 1, 0, 1)


@pytest.mark.parametrize("k", [0, 1, 4, 9, 13])  # about 9 batches per epoch: resumes cross epoch ends
@pytest.mark.parametrize("batch_size, shuffle_buffer", [(2, 4), (1, 0)])  # held samples / none
def test_resume_gives_bit_identical_batches(dataset, k, batch_size, shuffle_buffer):
    root, _ = dataset
    config = DataConfig(str(root), batch_size=batch_size, shuffle_buffer=shuffle_buffer, i2v_ratio=0.5, seed=11)
    m = 12
    reference = take(ShardBatches(config, rank=1, world_size=2), k + m)

    first = ShardBatches(config, rank=1, world_size=2)
    take(first, k)
    saved = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = ShardBatches(config, rank=1, world_size=2)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved
    for a, b in zip(reference[k:], take(resumed, m), strict=True):
        assert_batches_equal(a, b)


def test_resume_refuses_a_different_layout(dataset):
    root, _ = dataset
    config = DataConfig(str(root), batch_size=2)
    saved = ShardBatches(config, rank=0, world_size=2).state_dict()
    with pytest.raises(DataError, match="world_size"):
        ShardBatches(config, rank=0, world_size=4).load_state_dict(saved)
    with pytest.raises(DataError, match="batch_size"):
        ShardBatches(dataclasses.replace(config, batch_size=3), rank=0, world_size=2).load_state_dict(saved)


def test_resume_fails_clearly_when_a_held_sample_is_gone(dataset):
    root, _ = dataset
    config = DataConfig(str(root), batch_size=2, shuffle_buffer=4)
    loader = ShardBatches(config)
    next(loader)
    saved = loader.state_dict()
    held_shard = saved["state"]["shuffle"][0][0]
    (root / held_shard).unlink()
    with pytest.raises(DataError, match=f"cannot resume: {held_shard}"):
        ShardBatches(config).load_state_dict(saved)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_i2v_ratio_and_frame_zero_condition(dataset, ratio):
    root, _ = dataset
    modes = []
    for rank in (0, 1):
        loader = ShardBatches(DataConfig(str(root), batch_size=2, i2v_ratio=ratio), rank=rank, world_size=2)
        batches = take(loader, 40)
        for b in batches:
            if b.i2v:
                assert b.image_latent.shape == (2, 48, 1, *b.video.shape[-2:])
                assert torch.equal(bits(b.image_latent), bits(b.video[:, :, :1]))
        modes.append([b.i2v for b in batches])
    assert modes[0] == modes[1]  # every rank takes the same path at each step
    share = sum(modes[0]) / len(modes[0])
    if ratio in (0.0, 1.0):
        assert share == ratio
    else:
        assert 0.25 < share < 0.75


def member_offset(shard: Path, name: str) -> tuple[int, int]:
    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
        return member.offset_data, member.size


def test_corrupt_truncated_and_missing_shards_are_skipped_and_counted(dataset):
    root, samples = dataset
    keys_in = lambda shard: [m.name.split(".")[0] for m in tarfile.open(shard).getmembers()][::2]
    shards = sorted((root / "shards").glob("*.tar"))
    # a garbage safetensors member in shard 0, shard 1 cut mid-sample, shard 2 gone
    bad_key = keys_in(shards[0])[1]
    offset, _ = member_offset(shards[0], f"{bad_key}.{LATENTS_MEMBER}")
    data = bytearray(shards[0].read_bytes())
    data[offset: offset + 16] = b"\xff" * 16
    shards[0].write_bytes(bytes(data))
    cut_keys = keys_in(shards[1])
    offset, size = member_offset(shards[1], f"{cut_keys[2]}.{LATENTS_MEMBER}")
    shards[1].write_bytes(shards[1].read_bytes()[: offset + size // 2])
    gone_keys = keys_in(shards[2])
    shards[2].unlink()

    loader = ShardBatches(DataConfig(str(root), batch_size=2, shuffle_buffer=3))
    seen = {k for batch in take(loader, 25) for k in batch.keys}  # several epochs
    lost = {bad_key, *cut_keys[2:], *gone_keys}
    assert seen == set(samples) - lost
    c = loader.counters
    assert c.corrupt_samples >= 2 and c.shard_errors >= 2 and c.samples >= 25 * 2
    assert any(bad_key in m and shards[0].name in m for m in c.messages)
    assert any(shards[1].name in m for m in c.messages) and any(shards[2].name in m for m in c.messages)


def test_an_all_unreadable_dataset_stops_instead_of_hanging(dataset):
    root, _ = dataset
    for shard in (root / "shards").glob("*.tar"):
        shard.write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match="no new sample"):
        next(ShardBatches(DataConfig(str(root))))


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("i2v_ratio", 1.5), ("shuffle_buffer", -1),
                                          ("dtype", "int8"), ("text_len", 0), ("seed", -1)])
def test_bad_config_names_the_field(dataset, field, value):
    root, _ = dataset
    with pytest.raises(DataError, match=f"DataConfig.{field}"):
        ShardBatches(DataConfig(str(root), **{field: value}))


def test_text_longer_than_text_len_is_an_error_naming_the_key(dataset):
    root, samples = dataset
    longest = max(samples.values(), key=lambda s: (s.text_emb.shape[0], s.key))
    with pytest.raises(DataError, match=longest.key):
        ShardBatches(DataConfig(str(root), text_len=longest.text_emb.shape[0] - 1))


@pytest.mark.parametrize("missing", ["index.parquet", "negatives.safetensors", "dataset.json"])
def test_missing_dataset_file_is_named(dataset, missing):
    root, _ = dataset
    (root / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        ShardBatches(DataConfig(str(root)))


def test_missing_dir_wrong_schema_and_bad_rank_fail_clearly(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ShardBatches(DataConfig(str(tmp_path / "no_such_dir")))
    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**info, "schema_version": 2}))
    with pytest.raises(ValueError, match="dataset.json.*schema_version"):
        ShardBatches(DataConfig(str(root)))
    (root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="rank"):
        ShardBatches(DataConfig(str(root)), rank=2, world_size=2)


def test_trainer_entry_points(dataset):
    root, samples = dataset
    assert check_dataset(root, "tiny").shards == tuple(f"shards/0-{i:06d}.tar" for i in range(5))
    with pytest.raises(DataError, match="dataset.json.*'tiny'.*720x720_5s"):
        check_dataset(root, "720x720_5s")
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.data.i2v_ratio = 2, 1.0
    batch = next(build_loader(root, cfg, rank=1, world_size=2))
    assert batch.size == 2 and batch.i2v and batch.text.shape[1] == TINY.text_len
