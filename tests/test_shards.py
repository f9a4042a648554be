"""precompute/shards.py: the stage contract, on real tar shards read back through WebDataset."""
import dataclasses
import datetime
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
import webdataset as wds

from precompute.shards import (
    LATENTS_MEMBER,
    META_MEMBER,
    SCHEMA_VERSION,
    DatasetInfo,
    FailureRecord,
    Negatives,
    ReadStats,
    Sample,
    SampleError,
    SampleMeta,
    ShardWriter,
    append_failure,
    decode_sample,
    encode_sample,
    iter_shard,
    read_dataset_info,
    read_done_rows,
    read_failures,
    read_index,
    read_negatives,
    sample_key,
    write_dataset_info,
    write_index,
    write_negatives,
)
from precompute.variants import get_variant

TINY = get_variant("tiny")
TEXT_DIM = 32


def make_sample(i: int, bucket=(64, 64), n_tokens: int = 5) -> Sample:
    g = torch.Generator().manual_seed(i)
    h, w = bucket[0] // 16, bucket[1] // 16
    meta = SampleMeta(prompt=f"a dog barks {i} <AUDCAP>bark<ENDAUDCAP>", source=f"/videos/{i}.mp4", t0=0.5 * i,
                      t1=0.5 * i + TINY.frames / 24, source_fps=30.0, source_size=(70, 100), bucket=bucket,
                      variant="tiny", encoders={"Wan2.2_VAE.pth": "ab" * 32}, extra={"audio_peak": 0.5})
    return Sample(
        key=sample_key(meta.source, meta.t0, "tiny"),
        video_latent=torch.randn(48, TINY.latent_frames, h, w, generator=g).bfloat16(),
        audio_latent=torch.randn(TINY.audio_latents, 20, generator=g).bfloat16(),
        text_emb=torch.randn(n_tokens, TEXT_DIM, generator=g).bfloat16(),
        text_ids=torch.randint(0, 1000, (n_tokens,), generator=g, dtype=torch.int32),
        meta=meta,
    )


def assert_same(a: Sample, b: Sample) -> None:
    assert a.key == b.key and a.meta == b.meta
    for name in ("video_latent", "audio_latent", "text_emb", "text_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                           y.view(torch.int16) if y.dtype == torch.bfloat16 else y), name  # bit-exact


def shard_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "shards").iterdir() if ".tar" in p.name)


def test_sample_key_is_16_hex_deterministic_and_distinct():
    key = sample_key("/v/a.mp4", 1.5, "tiny")
    assert len(key) == 16 and all(c in "0123456789abcdef" for c in key)
    assert key == sample_key("/v/a.mp4", 1.5, "tiny")
    others = {sample_key("/v/b.mp4", 1.5, "tiny"), sample_key("/v/a.mp4", 1.6, "tiny"),
              sample_key("/v/a.mp4", 1.5, "720x720_5s"), sample_key("/v/a.mp4", 1.5, "tiny", SCHEMA_VERSION + 1)}
    assert key not in others and len(others) == 4


def test_write_then_read_with_webdataset_is_bit_exact(tmp_path):
    samples = [make_sample(i, n_tokens=3 + i) for i in range(3)]
    with ShardWriter(tmp_path, rank=0, maxcount=10) as writer:
        for s in samples:
            writer.write(s)
    shard = tmp_path / "shards" / "0-000000.tar"
    # plain WebDataset sees the documented member names
    raw = list(wds.tarfile_to_samples()([{"url": str(shard)}]))
    assert [r["__key__"] for r in raw] == [s.key for s in samples]
    assert {LATENTS_MEMBER, META_MEMBER} <= raw[0].keys()
    stats = ReadStats()
    for original, read in zip(samples, iter_shard(shard, stats), strict=True):
        assert_same(original, read)
    assert (stats.samples, stats.skipped) == (3, 0)


def _raw(sample: Sample, **tensor_overrides) -> dict:
    record = encode_sample(sample)
    if tensor_overrides:
        tensors = safetensors.torch.load(record[LATENTS_MEMBER])
        for name, value in tensor_overrides.items():
            if value is None:
                del tensors[name]
            else:
                tensors[name] = value
        record[LATENTS_MEMBER] = safetensors.torch.save(tensors)
    return record


def _with_meta(sample: Sample, **changes) -> dict:
    record = encode_sample(sample)
    meta = json.loads(record[META_MEMBER])
    for k, v in changes.items():
        if v is None:
            del meta[k]
        else:
            meta[k] = v
    record[META_MEMBER] = json.dumps(meta).encode()
    return record


@pytest.mark.parametrize(
    "corrupt, field",
    [
        (lambda s: {k: v for k, v in encode_sample(s).items() if k != LATENTS_MEMBER}, LATENTS_MEMBER),
        (lambda s: {k: v for k, v in encode_sample(s).items() if k != META_MEMBER}, META_MEMBER),
        (lambda s: {**encode_sample(s), LATENTS_MEMBER: b"\x08\x00\x00\x00garbage"}, LATENTS_MEMBER),
        (lambda s: {**encode_sample(s), META_MEMBER: b"{not json"}, META_MEMBER),
        (lambda s: _raw(s, text_ids=None), "text_ids"),
        (lambda s: _raw(s, video_latent=s.video_latent.float()), "video_latent"),
        (lambda s: _raw(s, audio_latent=s.audio_latent[None]), "audio_latent"),
        (lambda s: _raw(s, video_latent=s.video_latent[:47].contiguous()), "video_latent"),
        (lambda s: _raw(s, audio_latent=s.audio_latent[:, :19].contiguous()), "audio_latent"),
        (lambda s: _raw(s, audio_latent=torch.full_like(s.audio_latent, float("nan"))), "audio_latent"),
        (lambda s: _raw(s, text_ids=s.text_ids[:-1].contiguous()), "text_ids"),
        (lambda s: _with_meta(s, schema_version=SCHEMA_VERSION + 1), "json.schema_version"),
        (lambda s: _with_meta(s, bucket=[64, 96]), "video_latent"),
        (lambda s: _with_meta(s, prompt=None), "json.prompt"),
        (lambda s: _with_meta(s, variant="no_such_variant"), "json.variant"),
    ],
)
def test_decode_sample_names_the_key_and_field(corrupt, field):
    sample = make_sample(7)
    raw = corrupt(sample)
    raw["__url__"] = "shards/0-000004.tar"
    with pytest.raises(SampleError) as caught:
        decode_sample(raw)
    assert (caught.value.key, caught.value.field) == (sample.key, field)
    assert sample.key in str(caught.value) and "0-000004.tar" in str(caught.value)


def test_encode_refuses_a_bad_sample_before_it_reaches_a_shard(tmp_path):
    bad = dataclasses.replace(make_sample(1), text_emb=make_sample(1).text_emb.float())
    with ShardWriter(tmp_path, maxcount=4) as writer:
        with pytest.raises(SampleError, match="text_emb"):
            writer.write(bad)
        writer.write(make_sample(2))
    assert [s.key for s in iter_shard(tmp_path / "shards" / "0-000000.tar")] == [make_sample(2).key]


def test_shards_appear_only_when_finished(tmp_path):
    writer = ShardWriter(tmp_path, rank=3, maxcount=2)
    writer.write(make_sample(0))
    assert shard_files(tmp_path) == ["3-000000.tar.partial"]
    writer.write(make_sample(1))  # reaches maxcount: renamed
    writer.write(make_sample(2))
    assert shard_files(tmp_path) == ["3-000000.tar", "3-000001.tar.partial"]
    assert writer.done_keys == {make_sample(0).key, make_sample(1).key}
    rows = writer.close()
    assert shard_files(tmp_path) == ["3-000000.tar", "3-000001.tar"]
    assert [(r.key, r.shard) for r in rows] == [(make_sample(i).key, f"shards/3-00000{i // 2}.tar") for i in range(3)]


def test_a_new_bucket_gets_its_own_shard(tmp_path):
    a0, b0, a1 = make_sample(0), make_sample(1, bucket=(64, 96)), make_sample(2)
    with ShardWriter(tmp_path, maxcount=8) as writer:
        for s in (a0, b0, a1):
            writer.write(s)
    assert shard_files(tmp_path) == ["0-000000.tar", "0-000001.tar"]
    first = list(iter_shard(tmp_path / "shards" / "0-000000.tar"))
    second = list(iter_shard(tmp_path / "shards" / "0-000001.tar"))
    assert [s.key for s in first] == [a0.key, a1.key]
    assert [s.key for s in second] == [b0.key] and second[0].video_latent.shape == (48, 5, 4, 6)


def test_tars_are_byte_reproducible(tmp_path):
    for run in ("a", "b"):
        with ShardWriter(tmp_path / run, maxcount=8) as writer:
            for i in range(2):
                writer.write(make_sample(i))
    assert (tmp_path / "a/shards/0-000000.tar").read_bytes() == (tmp_path / "b/shards/0-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "a/shards/0-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_rerun_skips_finished_keys_and_never_writes_twice(tmp_path):
    crashed = ShardWriter(tmp_path, maxcount=2)
    for i in range(3):
        crashed.write(make_sample(i))
    del crashed  # the process dies here, without close(): sample 2 is only in a .partial

    writer = ShardWriter(tmp_path, maxcount=2)
    assert shard_files(tmp_path) == ["0-000000.tar"]  # the partial is gone
    assert writer.done_keys == {make_sample(0).key, make_sample(1).key}
    with pytest.raises(ValueError, match="already written"):
        writer.write(make_sample(1))
    for i in range(2, 4):
        writer.write(make_sample(i))
    rows = writer.close()
    assert shard_files(tmp_path) == ["0-000000.tar", "0-000001.tar"]
    assert sorted(r.key for r in rows) == sorted(make_sample(i).key for i in range(4))


def test_a_finished_shard_missing_from_the_done_list_is_recovered(tmp_path):
    with ShardWriter(tmp_path, maxcount=2) as writer:
        for i in range(3):
            writer.write(make_sample(i))
    done_list = tmp_path / "shards" / "0.done.jsonl"
    lines = done_list.read_text().splitlines(keepends=True)
    done_list.write_text(lines[0] + lines[1][:20])  # crash while appending the second line
    writer = ShardWriter(tmp_path, maxcount=2)
    assert writer.done_keys == {make_sample(i).key for i in range(3)}
    assert sorted(r.key for r in read_done_rows(tmp_path)) == sorted(writer.done_keys)


def _member_offsets(shard: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(shard) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def test_reader_counts_and_skips_a_corrupt_sample(tmp_path):
    samples = [make_sample(i) for i in range(3)]
    with ShardWriter(tmp_path, maxcount=8) as writer:
        for s in samples:
            writer.write(s)
    shard = tmp_path / "shards" / "0-000000.tar"
    offset, _ = _member_offsets(shard)[f"{samples[1].key}.{LATENTS_MEMBER}"]
    data = bytearray(shard.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16  # smash the safetensors header length
    shard.write_bytes(bytes(data))
    stats = ReadStats()
    assert [s.key for s in iter_shard(shard, stats)] == [samples[0].key, samples[2].key]
    assert stats.skipped == 1 and samples[1].key in stats.messages[0]


def test_reader_survives_a_truncated_shard(tmp_path):
    samples = [make_sample(i) for i in range(3)]
    with ShardWriter(tmp_path, maxcount=8) as writer:
        for s in samples:
            writer.write(s)
    shard = tmp_path / "shards" / "0-000000.tar"
    offset, size = _member_offsets(shard)[f"{samples[2].key}.{LATENTS_MEMBER}"]
    shard.write_bytes(shard.read_bytes()[: offset + size // 2])
    stats = ReadStats()
    assert [s.key for s in iter_shard(shard, stats)] == [samples[0].key, samples[1].key]
    assert stats.skipped >= 1


def test_index_parquet_has_one_row_per_sample(tmp_path):
    with ShardWriter(tmp_path, maxcount=2) as writer:
        for i, bucket in enumerate([(64, 64), (64, 96), (64, 64)]):
            writer.write(make_sample(i, bucket=bucket, n_tokens=4 + i))
        rows = writer.close()
    assert write_index(tmp_path / "index.parquet", read_done_rows(tmp_path)) == 3
    table = pq.read_table(tmp_path / "index.parquet")
    assert table.num_rows == 3
    assert table.column_names == ["key", "shard", "video_shape", "audio_len", "n_tokens", "bucket", "variant",
                                  "source", "t0"]
    by_key = {r["key"]: r for r in table.to_pylist()}
    s1 = make_sample(1, bucket=(64, 96), n_tokens=5)
    assert by_key[s1.key] == {"key": s1.key, "shard": "shards/0-000001.tar", "video_shape": [48, 5, 4, 6],
                              "audio_len": 22, "n_tokens": 5, "bucket": "64x96", "variant": "tiny",
                              "source": "/videos/1.mp4", "t0": 0.5}
    assert sorted(read_index(tmp_path / "index.parquet"), key=lambda r: r.key) == sorted(rows, key=lambda r: r.key)
    with pytest.raises(ValueError, match="both"):
        write_index(tmp_path / "dup.parquet", rows + rows[:1])


def test_negatives_round_trip(tmp_path):
    negatives = Negatives("jitter, bad hands", torch.randn(6, TEXT_DIM).bfloat16(), torch.arange(6, dtype=torch.int32),
                          "robotic, muffled", torch.randn(4, TEXT_DIM).bfloat16(), torch.arange(4, dtype=torch.int32))
    write_negatives(tmp_path / "negatives.safetensors", negatives)
    back = read_negatives(tmp_path / "negatives.safetensors")
    assert (back.video_prompt, back.audio_prompt) == (negatives.video_prompt, negatives.audio_prompt)
    assert torch.equal(back.video_emb.view(torch.int16), negatives.video_emb.view(torch.int16))
    assert torch.equal(back.audio_ids, negatives.audio_ids)
    with pytest.raises(ValueError, match="video_negative_ids"):
        write_negatives(tmp_path / "bad.safetensors",
                        dataclasses.replace(negatives, video_ids=torch.arange(5, dtype=torch.int32)))


def test_dataset_info_round_trip_and_checks(tmp_path):
    info = DatasetInfo(variant="tiny", video_latent_normalised=True, video_latent_mean=tuple([0.1] * 48),
                       video_latent_std=tuple([0.5] * 48), encoders={"Wan2.2_VAE.pth": "00" * 32},
                       counts={"samples": 3, "shards": 2, "failures": 1})
    write_dataset_info(tmp_path / "dataset.json", info)
    assert read_dataset_info(tmp_path / "dataset.json") == info
    with pytest.raises(ValueError, match="video_latent_std"):
        write_dataset_info(tmp_path / "bad.json", dataclasses.replace(info, video_latent_std=(0.5,) * 47))


def test_failures_append_one_json_line_each(tmp_path):
    path = tmp_path / "failures.jsonl"
    first = FailureRecord(12, "/v/a.mp4", "no_audio", "no_audio: no audio stream",
                          {"video": "/v/a.mp4", "prompt": "x", "added": datetime.date(2026, 1, 2)})
    second = FailureRecord(13, "/v/b.mp4", "timeout", "timeout: no result after 60s", {"video": "/v/b.mp4"})
    append_failure(path, first)
    append_failure(path, second)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["manifest_row"]["added"] == "2026-01-02"
    back = read_failures(path)
    assert [r.row for r in back] == [12, 13] and back[1] == second
