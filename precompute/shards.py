"""The contract between the stages: what one encoded clip looks like on disk, and the dataset files
around the shards (DESIGN.md "Shard sample", spec/data.md §8.2-8.3).

dataset/
  shards/{rank}-{n:06d}.tar    WebDataset tars; one sample per clip; one tensor shape per shard
  shards/{rank}.done.jsonl     per rank: one line per finished shard with its index rows
  index.parquet                every sample: key, shard, shapes, bucket, source
  negatives.safetensors        the video/audio negative-prompt embeddings, once per dataset
  dataset.json                 variant, schema version, latent normalisation, encoder hashes, counts
  failures.jsonl               every clip that could not be encoded, and why

A tar sample is ``<key>.latents.safetensors`` (video_latent bf16 [48,F,h,w], Wan2.2-VAE posterior
mean, normalised or not as dataset.json says; audio_latent bf16 [L,20], MMAudio posterior mean,
channel-last; text_emb bf16 [n_tokens,D] at its true length; text_ids int32 [n_tokens]) and
``<key>.json`` (SampleMeta). safetensors and JSON only: nothing here ever unpickles.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch
import webdataset as wds

from precompute.variants import VAE_STRIDE_S, get_variant
from precompute.fileio import atomic_write, fsync_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LATENTS_MEMBER = "latents.safetensors"
META_MEMBER = "json"
VIDEO_LATENT_CHANNELS = 48
AUDIO_LATENT_CHANNELS = 20
KEY_PATTERN = re.compile(r"^[0-9a-f]{16}$")
SHARD_NAME = re.compile(r"^(?P<rank>\d+)-(?P<n>\d{6})\.tar$")

# name -> (dtype, rank); shapes are checked against the variant and each other in validate_sample
TENSORS = {
    "video_latent": (torch.bfloat16, 4),
    "audio_latent": (torch.bfloat16, 2),
    "text_emb": (torch.bfloat16, 2),
    "text_ids": (torch.int32, 1),
}


class SampleError(ValueError):
    """A sample that breaks the schema; names the sample key, the field and (when known) the shard."""

    def __init__(self, key: str, field_name: str, problem: str, shard: str = ""):
        where = f" in {shard}" if shard else ""
        super().__init__(f"sample {key!r}{where}, field {field_name!r}: {problem}")
        self.key, self.field, self.problem, self.shard = key, field_name, problem, shard

    def __reduce__(self):
        return SampleError, (self.key, self.field, self.problem, self.shard)


@dataclass(frozen=True)
class SampleMeta:
    prompt: str                       # the exact string umT5 encoded
    source: str                       # the source video path or URI
    t0: float                         # clip window on the source's video timeline, seconds
    t1: float
    source_fps: float
    source_size: tuple[int, int]      # (height, width) of the source frames
    bucket: tuple[int, int]           # (height, width) of the pixels the VAE saw
    variant: str                      # a name in precompute.variants.VARIANTS
    encoders: dict[str, str] = field(default_factory=dict)  # encoder name -> weights hash / id
    extra: dict[str, Any] = field(default_factory=dict)     # free-form, JSON-serialisable (audio peak, padding, ...)
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Sample:
    key: str
    video_latent: torch.Tensor  # bf16 [48, F, h, w]
    audio_latent: torch.Tensor  # bf16 [L, 20]
    text_emb: torch.Tensor      # bf16 [n_tokens, D]
    text_ids: torch.Tensor      # int32 [n_tokens]
    meta: SampleMeta

    @property
    def shape_key(self) -> tuple[int, ...]:
        """Samples with equal shape keys can share a shard (and a batch)."""
        return (*self.video_latent.shape, *self.audio_latent.shape)


def sample_key(source_id: str, t0: float, variant: str, schema_version: int = SCHEMA_VERSION) -> str:
    """16 hex chars, no dots (WebDataset splits member names at the first dot); the same clip of
    the same source always gets the same key, so reruns and dedup are by key. ``source_id`` is
    the source path, or better its content hash."""
    text = f"{source_id}|{round(t0 * 1000)}|{variant}|v{schema_version}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


# Validation ----------------------------------------------------------------------------------

def validate_sample(sample: Sample, shard: str = "") -> None:
    """Raise SampleError unless the sample satisfies schema v1 for its variant."""
    key = sample.key

    def fail(name: str, problem: str) -> None:
        raise SampleError(key, name, problem, shard)

    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        fail("__key__", "must be 16 lowercase hex characters")
    meta = sample.meta
    if meta.schema_version != SCHEMA_VERSION:
        fail("json.schema_version", f"is {meta.schema_version}, this code reads {SCHEMA_VERSION}")
    try:
        variant = get_variant(meta.variant)
    except ValueError as exc:
        fail("json.variant", str(exc))
    for name, (dtype, rank) in TENSORS.items():
        tensor = getattr(sample, name)
        if not isinstance(tensor, torch.Tensor):
            fail(name, f"is {type(tensor).__name__}, not a tensor")
        if tensor.dtype != dtype:
            fail(name, f"dtype is {tensor.dtype}, expected {dtype}")
        if tensor.ndim != rank:
            fail(name, f"rank is {tensor.ndim} (shape {tuple(tensor.shape)}), expected {rank}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
            fail(name, "has NaN or infinite values")
    video_expected = (VIDEO_LATENT_CHANNELS, variant.latent_frames,
                      meta.bucket[0] // VAE_STRIDE_S, meta.bucket[1] // VAE_STRIDE_S)
    if tuple(sample.video_latent.shape) != video_expected:
        fail("video_latent", f"shape {tuple(sample.video_latent.shape)}, expected {video_expected} "
                             f"for variant {variant.name} and bucket {bucket_name(meta.bucket)}")
    audio_expected = (variant.audio_latents, AUDIO_LATENT_CHANNELS)
    if tuple(sample.audio_latent.shape) != audio_expected:
        fail("audio_latent", f"shape {tuple(sample.audio_latent.shape)}, expected {audio_expected}")
    n_tokens = sample.text_emb.shape[0]
    if not 1 <= n_tokens <= variant.text_len:
        fail("text_emb", f"has {n_tokens} tokens, expected 1..{variant.text_len}")
    if tuple(sample.text_ids.shape) != (n_tokens,):
        fail("text_ids", f"shape {tuple(sample.text_ids.shape)}, expected ({n_tokens},) like text_emb")
    if not meta.t1 > meta.t0 >= 0:
        fail("json.t0", f"window [{meta.t0}, {meta.t1}] is not a forward interval from >= 0")


# Encoding / decoding one sample --------------------------------------------------------------

def encode_sample(sample: Sample) -> dict[str, Any]:
    """Sample -> the dict wds.TarWriter writes (bytes values; validated first, so a bad sample
    never reaches a shard)."""
    validate_sample(sample)
    tensors = {name: getattr(sample, name).contiguous() for name in TENSORS}
    latents = safetensors.torch.save(tensors, metadata={"schema_version": str(SCHEMA_VERSION)})
    meta = json.dumps(dataclasses.asdict(sample.meta), sort_keys=True, ensure_ascii=False)
    return {"__key__": sample.key, LATENTS_MEMBER: latents, META_MEMBER: meta.encode("utf-8")}


def _meta_from_json(key: str, data: bytes, shard: str) -> SampleMeta:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError(key, META_MEMBER, f"not valid JSON: {exc}", shard) from None
    if not isinstance(raw, dict):
        raise SampleError(key, META_MEMBER, "is not a JSON object", shard)
    names = {f.name for f in dataclasses.fields(SampleMeta)}
    required = {f.name for f in dataclasses.fields(SampleMeta)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - raw.keys())
    if missing:
        raise SampleError(key, f"json.{missing[0]}", "missing", shard)
    try:
        values = {k: v for k, v in raw.items() if k in names}
        values["source_size"] = tuple(int(x) for x in values["source_size"])
        values["bucket"] = tuple(int(x) for x in values["bucket"])
        values["t0"], values["t1"] = float(values["t0"]), float(values["t1"])
        return SampleMeta(**values)
    except (TypeError, ValueError) as exc:
        raise SampleError(key, META_MEMBER, f"bad value: {exc}", shard) from None


def decode_sample(raw: Mapping[str, Any]) -> Sample:
    """A dict from WebDataset's tar reader (raw bytes per member) -> a validated Sample."""
    shard = str(raw.get("__url__", ""))
    key = raw.get("__key__")
    if not isinstance(key, str):
        raise SampleError(str(key), "__key__", "missing", shard)
    for member in (LATENTS_MEMBER, META_MEMBER):
        if member not in raw:
            raise SampleError(key, member, "missing from the tar", shard)
    meta = _meta_from_json(key, raw[META_MEMBER], shard)
    try:
        tensors = safetensors.torch.load(bytes(raw[LATENTS_MEMBER]))
    except Exception as exc:  # safetensors raises its own SafetensorError on any corruption
        raise SampleError(key, LATENTS_MEMBER, f"not readable safetensors: {exc}", shard) from None
    for name in TENSORS:
        if name not in tensors:
            raise SampleError(key, name, f"missing from {LATENTS_MEMBER}", shard)
    sample = Sample(key=key, meta=meta, **{name: tensors[name] for name in TENSORS})
    validate_sample(sample, shard)
    return sample


# Reading shards (the trainer's data.py builds on this) ----------------------------------------

@dataclass
class ReadStats:
    """What a reader skipped instead of dying: corrupt samples, truncated or unreadable shards."""
    samples: int = 0
    skipped: int = 0
    messages: list[str] = field(default_factory=list)
    max_messages: int = 100

    def skip(self, exc: BaseException) -> bool:
        """A WebDataset handler: log, count, carry on."""
        self.skipped += 1
        message = f"{type(exc).__name__}: {exc}"
        log.warning("skipping unreadable shard data: %s", message)
        if len(self.messages) < self.max_messages:
            self.messages.append(message)
        return True


def iter_shard(path: str | os.PathLike, stats: ReadStats | None = None) -> Iterator[Sample]:
    """Validated samples of one shard (a path or any WebDataset URL, e.g. ``pipe:...``). Corrupt
    samples and a truncated tail are counted in ``stats`` and skipped."""
    stats = stats if stats is not None else ReadStats()
    raw_samples = wds.tarfile_to_samples(handler=stats.skip)([{"url": str(path)}])
    for raw in raw_samples:
        try:
            sample = decode_sample(raw)
        except SampleError as exc:
            stats.skip(exc)
            continue
        stats.samples += 1
        yield sample


# Writing shards -------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexRow:
    key: str
    shard: str                          # relative to the dataset root, e.g. "shards/0-000003.tar"
    video_shape: tuple[int, int, int, int]
    audio_len: int
    n_tokens: int
    bucket: str                         # "HxW" in pixels
    variant: str
    source: str
    t0: float

    @classmethod
    def of(cls, sample: Sample, shard: str) -> IndexRow:
        return cls(sample.key, shard, tuple(sample.video_latent.shape), sample.audio_latent.shape[0],
                   sample.text_emb.shape[0], bucket_name(sample.meta.bucket), sample.meta.variant,
                   sample.meta.source, sample.meta.t0)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> IndexRow:
        return cls(**{**raw, "video_shape": tuple(raw["video_shape"])})


@dataclass
class _OpenShard:
    name: str
    file: Any
    tar: wds.TarWriter
    rows: list[IndexRow] = field(default_factory=list)


class ShardWriter:
    """Writes one rank's samples to ``root/shards/{rank}-{n:06d}.tar``.

    - A shard is written as ``*.tar.partial``, fsynced, then atomically renamed: a ``.tar`` name
      means a complete shard, and a crash leaves only ``.partial`` files, deleted on restart.
    - One tensor shape per shard: each shape key gets its own open shard, so interleaved buckets
      do not fragment each other; ``maxcount`` samples per shard.
    - Tars are reproducible (mtime 0, fixed owner and mode, members sorted).
    - Finished shards are listed with their index rows in ``shards/{rank}.done.jsonl``.
      ``done_keys`` holds every key already in a finished shard: the caller skips those clips,
      and ``write`` refuses a key twice. Samples in unfinished shards are lost by a crash and
      simply redone.
    """

    def __init__(self, root: str | os.PathLike, rank: int = 0, maxcount: int = 128):
        if rank < 0 or maxcount < 1:
            raise ValueError(f"need rank >= 0 and maxcount >= 1, got rank={rank}, maxcount={maxcount}")
        self.root, self.rank, self.maxcount = Path(root), rank, maxcount
        self.shard_dir = self.root / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.done_list = self.shard_dir / f"{rank}.done.jsonl"
        self._finished: list[IndexRow] = self._recover()
        self.done_keys: set[str] = {row.key for row in self._finished}
        numbers = [int(SHARD_NAME.match(Path(row.shard).name)["n"]) for row in self._finished]
        self._next_number = max(numbers, default=-1) + 1
        self._open: dict[tuple[int, ...], _OpenShard] = {}
        self._open_keys: set[str] = set()

    # -- resume --
    def _recover(self) -> list[IndexRow]:
        for partial in self.shard_dir.glob(f"{self.rank}-*.tar.partial"):
            log.info("deleting unfinished shard %s", partial)
            partial.unlink()
        listed: dict[str, list[IndexRow]] = {}
        if self.done_list.exists():
            lines = self.done_list.read_text("utf-8").splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                # A torn last line from a crash mid-append: drop it (its shard is recovered
                # below) so the next append does not glue onto it.
                lines.pop()
                atomic_write(self.done_list, "".join(lines).encode("utf-8"))
            for line in lines:
                entry = json.loads(line)
                listed[entry["shard"]] = [IndexRow.from_dict(r) for r in entry["rows"]]
        for shard, rows in listed.items():
            if not (self.root / shard).exists():
                raise FileNotFoundError(f"{self.done_list} lists {shard}, which is gone; the index would be wrong")
        on_disk = sorted(p for p in self.shard_dir.glob(f"{self.rank}-*.tar") if SHARD_NAME.match(p.name))
        for path in on_disk:
            shard = path.relative_to(self.root).as_posix()
            if shard in listed:
                continue
            # Renamed (so complete) but not yet listed: a crash between the rename and the append.
            stats = ReadStats()
            rows = [IndexRow.of(sample, shard) for sample in iter_shard(path, stats)]
            if stats.skipped:
                raise RuntimeError(f"{path}: a finished shard has unreadable data: {stats.messages[:3]}")
            self._append_done(shard, rows)
            listed[shard] = rows
        return [row for rows in listed.values() for row in rows]

    def _append_done(self, shard: str, rows: list[IndexRow]) -> None:
        line = json.dumps({"shard": shard, "rows": [dataclasses.asdict(r) for r in rows]}) + "\n"
        _append_line(self.done_list, line)

    # -- writing --
    def write(self, sample: Sample) -> None:
        if sample.key in self.done_keys or sample.key in self._open_keys:
            raise ValueError(f"sample {sample.key} ({sample.meta.source} @ {sample.meta.t0}s) was already written")
        record = encode_sample(sample)
        shape = sample.shape_key
        shard = self._open.get(shape) or self._open_new(shape)
        shard.tar.write(record)
        shard.rows.append(IndexRow.of(sample, shard.name))
        self._open_keys.add(sample.key)
        if len(shard.rows) >= self.maxcount:
            self._finish(shape)

    def _open_new(self, shape: tuple[int, ...]) -> _OpenShard:
        name = f"shards/{self.rank}-{self._next_number:06d}.tar"
        self._next_number += 1
        file = open(self.root / (name + ".partial"), "wb")
        shard = _OpenShard(name, file, wds.TarWriter(file, encoder=False, mtime=0))
        self._open[shape] = shard
        return shard

    def _finish(self, shape: tuple[int, ...]) -> None:
        shard = self._open.pop(shape)
        shard.tar.close()
        shard.file.flush()
        os.fsync(shard.file.fileno())
        shard.file.close()
        final = self.root / shard.name
        os.replace(final.with_name(final.name + ".partial"), final)
        fsync_dir(final.parent)
        self._append_done(shard.name, shard.rows)
        self._finished.extend(shard.rows)
        for row in shard.rows:
            self._open_keys.discard(row.key)
            self.done_keys.add(row.key)

    def close(self) -> list[IndexRow]:
        """Finish every open shard; return the index rows of all this rank's finished shards."""
        for shape in list(self._open):
            self._finish(shape)
        return list(self._finished)

    def abort(self) -> None:
        """Drop the open shards (their samples were never finished) without renaming them."""
        for shard in self._open.values():
            shard.file.close()
            Path(self.root / (shard.name + ".partial")).unlink(missing_ok=True)
        self._open.clear()
        self._open_keys.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_done_rows(root: str | os.PathLike) -> list[IndexRow]:
    """Index rows of every finished shard of every rank (for building index.parquet)."""
    rows: list[IndexRow] = []
    for done_list in sorted((Path(root) / "shards").glob("*.done.jsonl")):
        for line in done_list.read_text("utf-8").splitlines(keepends=True):
            if line.endswith("\n"):
                rows += [IndexRow.from_dict(r) for r in json.loads(line)["rows"]]
    return rows


# index.parquet ---------------------------------------------------------------------------------

_INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("video_shape", pa.list_(pa.int32(), 4)),
    ("audio_len", pa.int32()),
    ("n_tokens", pa.int32()),
    ("bucket", pa.string()),
    ("variant", pa.string()),
    ("source", pa.string()),
    ("t0", pa.float64()),
])


def write_index(path: str | os.PathLike, rows: Iterable[IndexRow]) -> int:
    """Write index.parquet sorted by key; refuses duplicate keys. Returns the row count."""
    rows = sorted(rows, key=lambda r: r.key)
    for a, b in zip(rows, rows[1:]):
        if a.key == b.key:
            raise ValueError(f"key {a.key} is in both {a.shard} and {b.shard}")
    columns = {name: [getattr(r, name) for r in rows] for name in _INDEX_SCHEMA.names}
    columns["video_shape"] = [list(shape) for shape in columns["video_shape"]]
    table = pa.Table.from_pydict(columns, schema=_INDEX_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write(Path(path), sink.getvalue().to_pybytes())
    return len(rows)


def read_index(path: str | os.PathLike) -> list[IndexRow]:
    table = pq.read_table(path)
    return [IndexRow.from_dict(r) for r in table.to_pylist()]


# negatives.safetensors -------------------------------------------------------------------------

@dataclass(frozen=True)
class Negatives:
    """The negative-prompt embeddings for CFG, once per dataset (bf16 [L, D], int32 [L])."""
    video_prompt: str
    video_emb: torch.Tensor
    video_ids: torch.Tensor
    audio_prompt: str
    audio_emb: torch.Tensor
    audio_ids: torch.Tensor


def _check_embedding(path: str, name: str, emb: torch.Tensor, ids: torch.Tensor) -> None:
    if emb.dtype != torch.bfloat16 or emb.ndim != 2 or emb.shape[0] < 1:
        raise ValueError(f"{path}: {name} must be bf16 [L>=1, D], got {emb.dtype} {tuple(emb.shape)}")
    if ids.dtype != torch.int32 or tuple(ids.shape) != (emb.shape[0],):
        raise ValueError(f"{path}: {name}_ids must be int32 [{emb.shape[0]}], got {ids.dtype} {tuple(ids.shape)}")
    if not bool(torch.isfinite(emb.float()).all()):
        raise ValueError(f"{path}: {name} has NaN or infinite values")


def write_negatives(path: str | os.PathLike, negatives: Negatives) -> None:
    _check_embedding(str(path), "video_negative", negatives.video_emb, negatives.video_ids)
    _check_embedding(str(path), "audio_negative", negatives.audio_emb, negatives.audio_ids)
    tensors = {"video_negative": negatives.video_emb.contiguous(), "video_negative_ids": negatives.video_ids.contiguous(),
               "audio_negative": negatives.audio_emb.contiguous(), "audio_negative_ids": negatives.audio_ids.contiguous()}
    metadata = {"schema_version": str(SCHEMA_VERSION), "video_prompt": negatives.video_prompt,
                "audio_prompt": negatives.audio_prompt}
    atomic_write(Path(path), safetensors.torch.save(tensors, metadata=metadata))


def read_negatives(path: str | os.PathLike) -> Negatives:
    path = str(path)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        names = set(f.keys())
        missing = sorted({"video_negative", "video_negative_ids", "audio_negative", "audio_negative_ids"} - names)
        if missing:
            raise ValueError(f"{path}: missing tensor {missing[0]!r}")
        tensors = {name: f.get_tensor(name) for name in names}
    if metadata.get("schema_version") != str(SCHEMA_VERSION):
        raise ValueError(f"{path}: schema_version {metadata.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    negatives = Negatives(metadata.get("video_prompt", ""), tensors["video_negative"], tensors["video_negative_ids"],
                          metadata.get("audio_prompt", ""), tensors["audio_negative"], tensors["audio_negative_ids"])
    _check_embedding(path, "video_negative", negatives.video_emb, negatives.video_ids)
    _check_embedding(path, "audio_negative", negatives.audio_emb, negatives.audio_ids)
    return negatives


# dataset.json ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    variant: str
    video_latent_normalised: bool            # True: stored as (mu - mean) / std, what Ovi's DiT sees
    video_latent_mean: tuple[float, ...]     # the 48 Wan2.2 constants used (or to use at load)
    video_latent_std: tuple[float, ...]
    encoders: dict[str, str]                 # file name -> sha256 of the weights that encoded this
    counts: dict[str, int]                   # samples, shards, failures
    audio_latent: str = "mmaudio_16k_posterior_mean_raw"  # Ovi feeds raw MMAudio means (spec/ovi.md §4.2)
    schema_version: int = SCHEMA_VERSION


def write_dataset_info(path: str | os.PathLike, info: DatasetInfo) -> None:
    for name in ("video_latent_mean", "video_latent_std"):
        values = getattr(info, name)
        if len(values) != VIDEO_LATENT_CHANNELS or not all(math.isfinite(v) for v in values):
            raise ValueError(f"dataset.json: {name} must be {VIDEO_LATENT_CHANNELS} finite numbers, got {len(values)}")
    if any(v <= 0 for v in info.video_latent_std):
        raise ValueError("dataset.json: video_latent_std must be positive")
    get_variant(info.variant)
    text = json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True)
    atomic_write(Path(path), (text + "\n").encode("utf-8"))


def read_dataset_info(path: str | os.PathLike) -> DatasetInfo:
    raw = json.loads(Path(path).read_text("utf-8"))
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {raw.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    names = {f.name for f in dataclasses.fields(DatasetInfo)}
    unknown = sorted(raw.keys() - names)
    if unknown:
        raise ValueError(f"{path}: unknown field {unknown[0]!r}")
    try:
        raw["video_latent_mean"] = tuple(float(v) for v in raw["video_latent_mean"])
        raw["video_latent_std"] = tuple(float(v) for v in raw["video_latent_std"])
        return DatasetInfo(**raw)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: bad or missing field: {exc}") from None


# failures.jsonl --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FailureRecord:
    row: int                      # manifest row number
    source: str
    reason: str                   # media.Reason value, or a stage name ("vae", "t5", "write", ...)
    error: str                    # the exception text
    manifest_row: dict[str, Any]  # the manifest row as read, so the clip can be retried as-is


def _append_line(path: Path, line: str) -> None:
    """One write() on an O_APPEND descriptor, then fsync: concurrent appenders do not interleave
    within a line on a local filesystem, and a crash loses at most the line being written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def append_failure(path: str | os.PathLike, record: FailureRecord) -> None:
    # default=str: manifest rows carry whatever the manifest reader produced (timestamps, numpy)
    line = json.dumps(dataclasses.asdict(record), ensure_ascii=False, default=str, sort_keys=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _append_line(Path(path), line + "\n")


def read_failures(path: str | os.PathLike) -> list[FailureRecord]:
    records = []
    for line in Path(path).read_text("utf-8").splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            records.append(FailureRecord(**json.loads(line)))
    return records
