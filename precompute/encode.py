"""Stage 1: a manifest of videos + prompts -> a WebDataset dataset of frozen-encoder latents.

    deepspeed precompute/encode.py --manifest M --shards DIR --variant 720x720_5s --encoders ckpts/
    torchrun --nproc-per-node 8 precompute/encode.py ...     (or plain `python`: one rank)
    python precompute/encode.py --manifest M --shards DIR --variant tiny   (tiny random encoders)

Per rank: read the whole manifest, take its share of the rows, decode clips in worker processes
(precompute.media.DecodePool: per-clip timeout, recycled workers, fed ahead of the GPU by a
background thread), umT5 over a few prompts at a time, the VAEs one clip at a time, and write
shards with precompute.shards.ShardWriter. Rank 0 then writes index.parquet, negatives.safetensors,
dataset.json and failures.jsonl (DESIGN.md "Shard sample").

Decisions:
  * Rows are shared out by sample key (key mod world size), not by row number: the same clip
    listed twice lands on the same rank, which records the second as a "duplicate" failure
    instead of two ranks writing one key twice.
  * A rerun skips every key in any rank's finished shards (so a rerun with another world size
    still never writes a sample twice) and retries every row that failed.
  * failures: each rank appends (one write + fsync per line) to failures/{rank}.jsonl, truncated
    when the run starts; rank 0 merges them, sorted by row, into failures.jsonl at the end.
    So failures.jsonl is the rows the latest run could not encode, and a crash loses none of the
    lines already written to failures/.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from precompute.distribution import init_distributed
from precompute.encoders.bundle import CKPTS_LAYOUT, EncoderBundle, EncoderFileError, EncoderPaths
from precompute.encoders.wan_vae import LATENT_MEAN_48, LATENT_STD_48
from precompute.media import ClipError, DecodedClip, DecodeJob, DecodePool, pixels_for_vae
from precompute.prompts import DEFAULT_AUDIO_NEGATIVE, DEFAULT_VIDEO_NEGATIVE, prompt_for_variant
from precompute.shards import (
    DatasetInfo, FailureRecord, Negatives, Sample, SampleError, SampleMeta, ShardWriter, append_failure,
    read_dataset_info, read_done_rows, sample_key, write_dataset_info, write_index, write_negatives,
)
from precompute.variants import VARIANTS, Variant, get_variant
from precompute import faults
from precompute.fileio import atomic_write

EXIT_OK = 0
EXIT_ROWS_FAILED = 1   # the dataset is complete for every good row; failures.jsonl lists the others
EXIT_USAGE = 2         # bad command line, manifest or encoder files: nothing was read or written
BAD_ROW = "bad_row"    # failure reason for a manifest row that cannot be parsed
DUPLICATE = "duplicate"
ENCODE_FAILED, T5_FAILED, INVALID_SAMPLE = "encode", "t5", "invalid_sample"


# Config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodeConfig:
    manifest: Path
    out: Path
    variant: Variant
    encoders: EncoderPaths | None
    samples_per_shard: int = 128
    decode_workers: int = 4
    decode_timeout_s: float = 120.0
    text_batch: int = 4
    device: str = "auto"           # auto | cpu | cuda
    dtype: str = "auto"            # auto (bf16 on GPU as Ovi, fp32 on CPU) | bf16 | fp32
    video_negative: str = DEFAULT_VIDEO_NEGATIVE
    audio_negative: str = DEFAULT_AUDIO_NEGATIVE
    hash_encoders: bool = True


_EPILOG = f"""\
encoder files (all four, or none with --variant tiny for seeded random tiny encoders):
  --encoders DIR takes them from a folder laid out as Ovi's ckpts/:
{chr(10).join(f'      DIR/{rel}' for rel in CKPTS_LAYOUT.values())}
  --wan-vae/--mmaudio-vae/--t5/--tokenizer name (or override) single ones. --t5 may be Wan's
  .pth or a transformers folder.

manifest: csv (with a header), jsonl or parquet with columns video, prompt and optional image,
  start, end (seconds). Relative paths are relative to the manifest's folder.

exit status: {EXIT_OK} every row encoded (or already done); {EXIT_ROWS_FAILED} some rows failed (listed with
  reasons in DIR/failures.jsonl; every good row was still written); {EXIT_USAGE} bad command line,
  manifest or encoder files (stopped before reading any clip).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="precompute/encode.py", description=__doc__.split("\n\n")[0],
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, type=Path, help="csv, jsonl or parquet")
    p.add_argument("--shards", "--out", dest="out", required=True, type=Path,
                   help="the dataset folder (tars go to DIR/shards/)")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--encoders", type=Path, help="a folder laid out as Ovi's ckpts/")
    p.add_argument("--wan-vae", type=Path)
    p.add_argument("--mmaudio-vae", type=Path)
    p.add_argument("--t5", type=Path)
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--decode-workers", type=int, default=4, help="decoder processes per rank")
    p.add_argument("--decode-timeout", type=float, default=120.0, help="seconds per clip before its decoder is killed")
    p.add_argument("--text-batch", type=int, default=4,
                   help="prompts per umT5 call (umT5 is ~4 ms/prompt on an H200 against ~1 s for the VAE; "
                        "every clip of a batch is held in memory)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="video VAE and umT5 dtype")
    p.add_argument("--video-negative", default=DEFAULT_VIDEO_NEGATIVE)
    p.add_argument("--audio-negative", default=DEFAULT_AUDIO_NEGATIVE)
    p.add_argument("--no-hash-encoders", action="store_true", help="record encoder paths instead of sha256")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    return p


def parse_args(argv: Sequence[str] | None = None) -> EncodeConfig:
    parser = build_parser()
    a = parser.parse_args(argv)
    for name, value, low in (("--samples-per-shard", a.samples_per_shard, 1), ("--decode-workers", a.decode_workers, 1),
                             ("--text-batch", a.text_batch, 1)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    if not a.decode_timeout > 0:
        parser.error(f"--decode-timeout must be > 0, got {a.decode_timeout}")
    if not a.manifest.is_file():
        parser.error(f"--manifest {a.manifest}: no such file")
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    paths = EncoderPaths.from_ckpts_dir(a.encoders) if a.encoders else EncoderPaths()
    paths = paths.override(wan_vae=a.wan_vae, mmaudio_vae=a.mmaudio_vae, t5=a.t5, tokenizer=a.tokenizer)
    return EncodeConfig(
        manifest=a.manifest, out=a.out, variant=get_variant(a.variant), encoders=paths if paths.given else None,
        samples_per_shard=a.samples_per_shard, decode_workers=a.decode_workers, decode_timeout_s=a.decode_timeout,
        text_batch=a.text_batch, device=a.device, dtype=a.dtype, video_negative=a.video_negative,
        audio_negative=a.audio_negative, hash_encoders=not a.no_hash_encoders,
    )


# Manifest -------------------------------------------------------------------------------------

class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, unknown format, no video/prompt column)."""


@dataclass(frozen=True)
class ManifestRow:
    row: int                 # 0-based record number (csv: after the header; jsonl: line; parquet: row)
    video: Path              # absolute
    source_id: str           # the path relative to the manifest's folder: what the sample key hashes
    prompt: str              # formatted for the variant (precompute.prompts)
    image: Path | None
    start: float | None
    end: float | None
    key: str
    raw: dict[str, Any]      # the row as read, for failures.jsonl


@dataclass(frozen=True)
class BadRow:
    row: int
    error: str
    raw: dict[str, Any]
    reason: str = BAD_ROW


REQUIRED_COLUMNS = ("video", "prompt")


def _printable(value: Any) -> Any:
    """A manifest value safe to write as UTF-8 JSON: bytes that were not UTF-8 become \\xNN."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _has_bad_bytes(value: Any) -> bool:
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def _raw_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise ManifestError(f"{path}: cannot read as parquet: {exc}") from None
        _check_columns(path, table.column_names)
        for i, record in enumerate(table.to_pylist()):
            yield i, record
    elif suffix == ".jsonl":
        for i, line in enumerate(path.read_bytes().split(b"\n")):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                text = line.decode("utf-8", "backslashreplace")
                yield i, BadRow(i, f"line {i + 1} is not valid UTF-8: {exc}", {"line": text})
                continue
            except json.JSONDecodeError as exc:
                yield i, BadRow(i, f"line {i + 1} is not JSON: {exc}", {"line": line.decode("utf-8")})
                continue
            if not isinstance(record, dict):
                yield i, BadRow(i, f"line {i + 1} is not a JSON object", {"line": line.decode("utf-8")})
                continue
            yield i, record
    elif suffix in (".csv", ".tsv"):
        # Decode with surrogateescape so one row's bad bytes fail that row, not the file.
        text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        header = reader.fieldnames or []
        if any(_has_bad_bytes(name) for name in header):
            raise ManifestError(f"{path}: the header is not valid UTF-8")
        _check_columns(path, header)
        for i, record in enumerate(reader):
            extra = record.pop(None, None)  # fields beyond the header
            if extra:
                record["_extra_fields"] = extra
            bad = sorted(k for k, v in record.items() if _has_bad_bytes(v) or (isinstance(v, list) and any(map(_has_bad_bytes, v))))
            if bad:
                raw = {k: ([_printable(x) for x in v] if isinstance(v, list) else _printable(v)) for k, v in record.items()}
                yield i, BadRow(i, f"field {bad[0]!r} has bytes that are not UTF-8", raw)
                continue
            yield i, record
    else:
        raise ManifestError(f"{path}: unknown manifest format {suffix!r}; use .csv, .jsonl or .parquet")


def _check_columns(path: Path, columns: Sequence[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"{path}: no {missing[0]!r} column (columns: {list(columns)})")


def _optional_time(record: dict[str, Any], name: str) -> float | None:
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"field {name!r}: {value!r} is not a time in seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"field {name!r}: {value!r} is not a time in seconds") from None
    if math.isnan(seconds) and not isinstance(value, str):
        return None  # a parquet/pandas null
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"field {name!r}: {value!r} must be a finite time >= 0")
    return seconds


def _resolve(base: Path, value: Any, name: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {name!r}: missing or empty")
    path = Path(value.strip())
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def parse_row(row: int, record: dict[str, Any], base: Path, variant: Variant) -> ManifestRow | BadRow:
    """One manifest record -> a row to encode, or a BadRow naming the field (never raises)."""
    raw = {k: _printable(v) for k, v in record.items()}
    try:
        video = _resolve(base, record.get("video"), "video")
        try:
            source_id = video.relative_to(base).as_posix()
        except ValueError:
            source_id = str(video)
        prompt_value = record.get("prompt")
        try:
            prompt = prompt_for_variant(prompt_value if prompt_value is not None else "", variant)
        except ValueError as exc:
            raise ValueError(f"field 'prompt': {exc}") from None
        image = None if record.get("image") in (None, "") else _resolve(base, record.get("image"), "image")
        start, end = _optional_time(record, "start"), _optional_time(record, "end")
    except ValueError as exc:
        return BadRow(row, str(exc), raw)
    if image is not None and not image.exists():
        return BadRow(row, f"field 'image': {image} does not exist", raw, reason="missing")
    key = sample_key(source_id, start or 0.0, variant.name)
    return ManifestRow(row, video, source_id, prompt, image, start, end, key, raw)


def read_manifest(path: Path, variant: Variant) -> list[ManifestRow | BadRow]:
    """Every record of the manifest, parsed; raises ManifestError only for the file as a whole."""
    path = Path(path)
    base = Path(os.path.normpath(path.resolve().parent))
    try:
        return [record if isinstance(record, BadRow) else parse_row(i, record, base, variant)
                for i, record in _raw_records(path)]
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: not a readable csv: {exc}") from None


def rank_of(entry: ManifestRow | BadRow, world: int) -> int:
    """Which rank handles the entry: by sample key, so duplicates meet on one rank."""
    if isinstance(entry, ManifestRow):
        return int(entry.key[:8], 16) % world
    return entry.row % world


# Encoding one clip ------------------------------------------------------------------------------

@torch.inference_mode()
def encode_clip(bundle: EncoderBundle, variant: Variant, row: ManifestRow, clip: DecodedClip,
                text_emb: torch.Tensor, text_ids: torch.Tensor) -> Sample:
    """A decoded clip and its encoded prompt -> the shard sample (bf16 latents on the CPU)."""
    pixels = pixels_for_vae(clip.frames.to(bundle.device), bundle.video_vae.dtype)
    video = bundle.video_vae.encode(pixels[None])[0]
    audio = bundle.audio_vae.encode(clip.audio[None].to(bundle.device, torch.float32))[0]
    info = clip.info
    meta = SampleMeta(
        prompt=row.prompt, source=row.source_id, t0=info.t0, t1=info.t1, source_fps=info.source_fps,
        source_size=info.source_size, bucket=info.bucket, variant=variant.name, encoders=dict(bundle.ids),
        extra={"manifest_row": row.row, "image": None if row.image is None else str(row.image),
               "frame_times": list(info.frame_times), "video_backend": info.video_backend,
               "audio_rate_in": info.audio_rate_in, "audio_channels_in": info.audio_channels_in,
               "audio_padded_samples": info.audio_padded_samples, "audio_peak": info.audio_peak},
    )
    return Sample(key=row.key, video_latent=video.to(torch.bfloat16).cpu(), audio_latent=audio.to(torch.bfloat16).cpu(),
                  text_emb=text_emb.to(torch.bfloat16).cpu(), text_ids=text_ids.to(torch.int32).cpu(), meta=meta)


# Running one rank -------------------------------------------------------------------------------

@dataclass
class RankStats:
    written: int = 0
    skipped_done: int = 0
    failed: Counter = field(default_factory=Counter)  # reason -> rows


class FailureLog:
    """This rank's failures/{rank}.jsonl for this run (one fsynced line per row), and counts by reason."""

    def __init__(self, root: Path, rank: int):
        self.path = root / "failures" / f"{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # the last run's; its rows are retried
        self.counts: Counter = Counter()

    def add(self, row: int, source: str, reason: str, error: str, raw: dict[str, Any]) -> None:
        append_failure(self.path, FailureRecord(row=row, source=source, reason=reason, error=error, manifest_row=raw))
        self.counts[reason] += 1


def _background(iterator: Iterator, depth: int) -> Iterator:
    """Iterate ``iterator`` in a thread, ``depth`` items ahead, so decoding goes on while the
    caller is busy on the GPU (DecodePool only hands out work while it is being iterated)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in iterator:
                if not put((item, None)):
                    break
            put((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((end, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="decode-feeder", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _batches(iterator: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in iterator:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_rows(cfg: EncodeConfig, bundle: EncoderBundle, rows: list[ManifestRow], writer: ShardWriter,
                failures: FailureLog, progress) -> int:
    """Decode, encode and write ``rows`` (already filtered for done keys); every problem becomes a
    failure line, every other row a sample. ``progress.update(n)`` per finished row. Returns the
    number of samples written."""
    written = 0
    by_row = {row.row: row for row in rows}
    jobs = (DecodeJob(str(row.video), row.start, row.end, tag=row.row) for row in rows)
    with DecodePool(cfg.variant, workers=cfg.decode_workers, timeout_s=cfg.decode_timeout_s) as pool, \
            contextlib.closing(_background(pool.imap(jobs), depth=max(2, cfg.decode_workers))) as decoded:
        # closing(): the feeder thread stops before the pool's workers are shut down. Decoded clips
        # held at once: text_batch + feeder depth + the pool's workers + prefetch (180 MB each at
        # 704x704x121 uint8).
        for batch in _batches(decoded, cfg.text_batch):
            good: list[tuple[ManifestRow, DecodedClip]] = []
            for job, result in batch:
                row = by_row[job.tag]
                if isinstance(result, ClipError):
                    failures.add(row.row, row.source_id, result.reason.value, str(result), row.raw)
                    progress.update(1)
                else:
                    good.append((row, result))
            if not good:
                continue
            try:
                texts = bundle.text.encode_with_ids([row.prompt for row, _ in good])
            except Exception as exc:  # a prompt the tokenizer or T5 cannot take; keep going
                for row, _ in good:
                    failures.add(row.row, row.source_id, T5_FAILED, f"{type(exc).__name__}: {exc}", row.raw)
                progress.update(len(good))
                continue
            for (row, clip), emb, ids in zip(good, texts.contexts, texts.text_ids):
                try:
                    writer.write(encode_clip(bundle, cfg.variant, row, clip, emb, ids))
                    written += 1
                    faults.reach("sample_written", written)
                except SampleError as exc:
                    failures.add(row.row, row.source_id, INVALID_SAMPLE, str(exc), row.raw)
                except (RuntimeError, ValueError) as exc:  # torch errors (incl. CUDA OOM) on this clip
                    failures.add(row.row, row.source_id, ENCODE_FAILED, f"{type(exc).__name__}: {exc}", row.raw)
                progress.update(1)
    return written


def plan_rank(entries: list[ManifestRow | BadRow], rank: int, world: int, done_keys: set[str],
              failures: FailureLog) -> tuple[list[ManifestRow], int]:
    """This rank's rows still to encode and how many it skips as done; its bad rows and
    duplicates go to the failure log."""
    todo: list[ManifestRow] = []
    skipped = 0
    first_row: dict[str, int] = {}
    for entry in entries:
        if rank_of(entry, world) != rank:
            continue
        if isinstance(entry, BadRow):
            failures.add(entry.row, _printable(str(entry.raw.get("video", ""))), entry.reason, entry.error, entry.raw)
        elif entry.key in first_row:
            failures.add(entry.row, entry.source_id, DUPLICATE,
                         f"same clip (source and start) as row {first_row[entry.key]}, key {entry.key}", entry.raw)
        else:
            first_row[entry.key] = entry.row
            if entry.key in done_keys:
                skipped += 1
            else:
                todo.append(entry)
    # Key order (a hash): neighbouring clips of one source land in different places, so a shard read
    # front to back (the trainer's loader, through a small shuffle buffer) gives mixed batches.
    todo.sort(key=lambda entry: entry.key)
    return todo, skipped


# Finishing (rank 0) -----------------------------------------------------------------------------

def merge_failures(root: Path, world: int) -> int:
    """failures/{rank}.jsonl of this run -> failures.jsonl sorted by row; returns the count."""
    lines: list[tuple[int, str]] = []
    for path in sorted((root / "failures").glob("*.jsonl")):
        if not path.stem.isdigit() or int(path.stem) >= world:
            path.unlink()  # a previous run with more ranks
            continue
        for line in path.read_text("utf-8").splitlines(keepends=True):
            if line.endswith("\n") and line.strip():  # a line torn by a crash has no newline
                lines.append((json.loads(line)["row"], line))
    lines.sort(key=lambda item: item[0])
    atomic_write(root / "failures.jsonl", "".join(line for _, line in lines).encode("utf-8"))
    return len(lines)


def encode_negatives(bundle: EncoderBundle, video_prompt: str, audio_prompt: str) -> Negatives:
    encoded = bundle.text.encode_with_ids([video_prompt, audio_prompt])
    (video_emb, audio_emb), (video_ids, audio_ids) = encoded.contexts, encoded.text_ids
    bf16 = lambda t: t.to(torch.bfloat16).cpu()
    return Negatives(video_prompt, bf16(video_emb), video_ids.cpu(), audio_prompt, bf16(audio_emb), audio_ids.cpu())


def finish_dataset(cfg: EncodeConfig, bundle: EncoderBundle, world: int) -> dict[str, int]:
    n_failures = merge_failures(cfg.out, world)
    rows = read_done_rows(cfg.out)
    write_index(cfg.out / "index.parquet", rows)
    write_negatives(cfg.out / "negatives.safetensors", encode_negatives(bundle, cfg.video_negative, cfg.audio_negative))
    counts = {"samples": len(rows), "shards": len({r.shard for r in rows}), "failures": n_failures}
    write_dataset_info(cfg.out / "dataset.json", DatasetInfo(
        variant=cfg.variant.name, video_latent_normalised=True, video_latent_mean=LATENT_MEAN_48,
        video_latent_std=LATENT_STD_48, encoders=dict(bundle.ids), counts=counts))
    return counts


def check_existing_dataset(cfg: EncodeConfig, bundle: EncoderBundle) -> None:
    """A rerun must use the variant and encoder weights the finished part was made with."""
    path = cfg.out / "dataset.json"
    if not path.exists():
        return
    info = read_dataset_info(path)
    if info.variant != cfg.variant.name:
        raise ValueError(f"{path}: the dataset here is variant {info.variant}, not {cfg.variant.name}; use another --shards")
    changed = sorted(k for k in bundle.ids if info.encoders.get(k) != bundle.ids[k])
    if changed:
        raise ValueError(f"{path}: the dataset here was encoded with other {changed[0]} weights "
                         f"({info.encoders.get(changed[0])} vs {bundle.ids[changed[0]]}); use another --shards")


def summary_line(stats: Sequence[RankStats], counts: dict[str, int], out: Path) -> str:
    failed: Counter = sum((s.failed for s in stats), Counter())
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(failed.items()))
    return (f"encode: {sum(s.written for s in stats)} written, {sum(s.skipped_done for s in stats)} skipped "
            f"(already done), {sum(failed.values())} failed" + (f" ({reasons})" if reasons else "") +
            f"; dataset {out}: {counts['samples']} samples in {counts['shards']} shards, "
            f"failures in {out / 'failures.jsonl'}")


# Entry --------------------------------------------------------------------------------------------

def _device_and_dtype(cfg: EncodeConfig) -> tuple[bool, torch.dtype]:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.dtype == "auto":
        return use_cuda, torch.bfloat16 if use_cuda else torch.float32
    return use_cuda, {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]


def run(cfg: EncodeConfig) -> int:
    from tqdm import tqdm

    use_cuda, dtype = _device_and_dtype(cfg)
    dist = init_distributed(use_cuda)
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")

    # Everything that can be wrong with the command line, manifest or encoders, before any clip.
    error, entries, bundle = None, [], None
    try:
        entries = read_manifest(cfg.manifest, cfg.variant)
        bundle = EncoderBundle.load(cfg.variant, cfg.encoders, device, dtype,
                                    cache_dir=cfg.out / ".cache" / f"rank{dist.rank}", hash_files=cfg.hash_encoders)
        check_existing_dataset(cfg, bundle)
    except (ManifestError, EncoderFileError, FileNotFoundError, ValueError) as exc:
        error = f"rank {dist.rank}: {exc}"
    errors = [e for e in dist.gather(error) if e]
    if errors:
        if dist.rank == 0:
            print(f"error: {errors[0]}", file=sys.stderr, flush=True)
        return EXIT_USAGE

    with ShardWriter(cfg.out, rank=dist.rank, maxcount=cfg.samples_per_shard) as writer:
        dist.barrier()  # every rank has recovered its shards before anyone reads the done lists
        done_keys = {row.key for row in read_done_rows(cfg.out)}
        failures = FailureLog(cfg.out, dist.rank)
        todo, skipped = plan_rank(entries, dist.rank, dist.world, done_keys, failures)
        progress = tqdm(total=len(todo), unit="clip", desc=f"encode {cfg.variant.name}", disable=dist.rank != 0,
                        mininterval=2.0, file=sys.stderr)
        started = time.monotonic()
        written = encode_rows(cfg, bundle, todo, writer, failures, progress)
        progress.close()
        writer.close()
    stats = RankStats(written, skipped, failures.counts)
    elapsed = time.monotonic() - started
    all_stats = dist.gather(stats)  # also the barrier before rank 0 reads every rank's files
    if dist.rank == 0:
        counts = finish_dataset(cfg, bundle, dist.world)
        total_written = sum(s.written for s in all_stats)
        print(summary_line(all_stats, counts, cfg.out) + f"; {total_written / max(elapsed, 1e-9):.2f} clips/s",
              flush=True)
    dist.barrier()  # nobody exits (and so gets the run killed by the launcher) before rank 0 is done
    return EXIT_ROWS_FAILED if any(sum(s.failed.values()) for s in all_stats) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)  # exits with EXIT_USAGE (argparse's 2) on a bad command line
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
