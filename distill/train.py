"""Stage 2: DMD distillation of Ovi (or plain flow-matching fine-tuning) under DeepSpeed ZeRO-3.

    deepspeed distill/train.py --deepspeed ds_configs/zero3.json --config distill/configs/ovi_720_5s.yaml \\
        --data DATASET_DIR --out RUN_DIR [--max-steps N] [--save-every N] [--resume [--resume-fallback]] [key=value ...]

One step = one critic (fake score) update, plus one generator update every `dmd.critic_ratio`
steps, taken first (DMD2's two-time-scale rule). The VAEs and the text encoder are never
loaded: batches come from precompute's shards. Preemption (SIGUSR1/SIGTERM) finishes the
current step, saves, and exits 0 so a requeued job resumes with --resume.

Exit status: 0 done (or preempted and saved); 2 bad command line, config, dataset or checkpoint
to resume (named, nothing started); 3 too many non-finite steps in a row; 4 the data ran out
(every shard unreadable on some rank).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed distill/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from distill import checkpoint, dmd, fault_hooks
from distill.config import ConfigError, TrainConfig, load_config, to_dict
from distill.metrics import MetricsLog
from distill.schedules import SCHEDULER_IN_DS_CONFIG, lr_factor
from precompute import faults

EXIT_PREEMPTED, EXIT_USAGE, EXIT_NONFINITE, EXIT_DATA = 0, 2, 3, 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", required=True, help="DeepSpeed ZeRO-3 JSON (ds_configs/zero3.json)")
    parser.add_argument("--config", required=True, help="training recipe YAML (distill/configs/*.yaml)")
    parser.add_argument("--data", required=True, help="dataset directory written by precompute/encode.py")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, wandb")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--save-every", type=int)
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoints/latest; a missing or damaged one stops the run (exit 2), naming the file")
    parser.add_argument("--resume-fallback", action="store_true",
                        help="with --resume: if the checkpoint latest names is missing or damaged, continue from the newest "
                             "intact one (the damaged ones are moved to OUT/checkpoints/damaged-step-N)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. generator_optim.lr=1e-6")
    return parser.parse_args(argv)


def load_ds_config(path: str) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if cfg.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(f"{path}: zero_optimization.stage must be 3")
    if "scheduler" in cfg:
        raise ConfigError(f"{path}: {SCHEDULER_IN_DS_CONFIG}")
    return cfg


def prepare(args) -> tuple[TrainConfig, dict, checkpoint.ResumePlan | None]:
    """Everything that can be wrong with the command line, the config, the dataset or the
    checkpoint to resume from, checked before any process group or model exists."""
    if args.resume_fallback and not args.resume:
        raise ConfigError("--resume-fallback needs --resume")
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"save_every={args.save_every}")
    cfg = load_config(args.config, overrides)
    ds_config = load_ds_config(args.deepspeed)
    from distill.data import check_dataset, check_pairs
    check_dataset(args.data, cfg.model.variant)
    if cfg.objective == "dmd" and (cfg.dmd.regression_weight > 0) != (cfg.data.pairs is not None):
        raise ConfigError("config fields dmd.regression_weight and data.pairs go together: the regression term needs "
                          "teacher pairs (write them with distill/pairs.py, then data.pairs=DIR), and pairs need a weight "
                          f"(got dmd.regression_weight={cfg.dmd.regression_weight}, data.pairs={cfg.data.pairs!r})")
    if cfg.objective == "dmd" and cfg.dmd.guidance == "samples":
        check_guided_teacher(cfg)
    if cfg.data.pairs is not None:
        found = check_pairs(cfg.data.pairs, cfg)
        drawn = {mode for mode, ratio in (("t2v", 1 - cfg.data.i2v_ratio), ("i2v", cfg.data.i2v_ratio)) if ratio > 0}
        if cfg.objective == "flow" and drawn - set(found):
            raise ConfigError(f"objective flow with data.pairs={cfg.data.pairs} fine-tunes on the teacher's pairs, but it "
                              f"has none for {sorted(drawn - set(found))} (data.i2v_ratio={cfg.data.i2v_ratio}): that "
                              "mode would train on the data instead; make them with distill/pairs.py")
    plan = checkpoint.plan_resume(Path(args.out), args.resume_fallback) if args.resume else None
    return cfg, ds_config, plan


def check_guided_teacher(cfg: TrainConfig) -> None:
    """dmd.guidance=samples queries the teacher without CFG: it must be a guided fine-tune's export
    (made on pairs of this run's guidance), or DMD would distil the unguided teacher without a word."""
    from distill.export import guided_samples_of
    how = ("fine-tune the teacher on its pairs (objective=flow data.pairs=PAIRS) and export it with "
           "distill/export.py --raw; or use dmd.guidance=score with the original teacher")
    if not cfg.model.checkpoint:
        raise ConfigError(f"config field dmd.guidance=samples needs model.checkpoint, a guided fine-tune's export: {how}")
    made = guided_samples_of(cfg.model.checkpoint)
    if made is None:
        raise ConfigError(f"config field dmd.guidance=samples: {cfg.model.checkpoint} is not a guided fine-tune's "
                          f"export (no guided_samples metadata): {how}")
    wanted = dmd.pair_guidance(cfg.dmd)
    if made != wanted:
        raise ConfigError(f"config field dmd.guidance=samples: {cfg.model.checkpoint} was fine-tuned on pairs made "
                          f"with {made}, but this run's dmd.* say {wanted}")


class StopFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's preemption warning); honoured at the end of a step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.requested = True

    def any_rank(self, device) -> bool:
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def share_exit_rng(rng: torch.Generator) -> None:
    """Every ZeRO-3 rank must run the same number of student forwards, so every rank draws the exit
    index from the same CPU generator (seeded alike, advanced alike: no collective per step). Once
    after a resume, rank 0's state is copied to all ranks, so that checkpoints written when only
    rank 0 drew resume in step too."""
    box = [rng.get_state()]
    dist.broadcast_object_list(box, src=0)
    rng.set_state(box[0])


def finite_on_every_rank(loss: torch.Tensor) -> torch.Tensor:
    """1-element bool tensor on the loss's device: the loss is finite on every rank. Reduced on
    the device and not read here, so the host keeps queueing the backward."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag > 0


def update(engine, loss) -> torch.Tensor:
    """Backward and step, skipped on every rank if any rank's loss is NaN/Inf. Returns that flag
    (a device tensor; read it after the step).

    The skip needs no host read: where any loss is non-finite, every rank back-propagates
    loss·NaN, so every gradient is NaN, the global gradient norm (reduced over the ranks) is
    NaN, and DeepSpeed's ZeRO-3 step discards the update and the gradients on every rank
    (`is_invalid_grad_norm`). DeepSpeed's step reads that norm on the host anyway, so the flag
    is complete by the time the caller reads it."""
    ok = finite_on_every_rank(loss)
    poison = torch.where(ok, 1.0, float("nan")).to(loss.dtype).reshape(loss.shape)
    engine.backward(loss * poison)
    engine.step()
    return ok


def train_step(step: int, engines, batches, pairs, dmd_cfg, rngs, device, cfg: TrainConfig
               ) -> tuple[dict, bool, list[str]]:
    """One step; returns (metrics as tensors/numbers, every update finite, the sample keys it used).
    `pairs` (or None) turns the generator's data batch into a batch of teacher pairs of the same mode."""
    metrics, flags, keys = {}, [], []
    n_steps = dmd_cfg.n_steps

    def take(batch):
        keys.extend(batch.keys)
        return batch.to(device)

    if cfg.objective == "flow":  # on the data, or with data.pairs on the teacher's samples (the guided fine-tune)
        batch = next(batches) if pairs is None else pairs(next(batches))
        loss, m = dmd.flow_loss(engines.generator, take(batch), dmd_cfg, rngs["noise"])
        flags.append(update(engines.generator, loss))
        return {**m, "forward_passes": 1}, all(bool(f) for f in flags), keys
    passes = 0
    if dmd.is_generator_step(step, dmd_cfg):
        exit_index = dmd.draw_exit_index(rngs["exit"], n_steps)
        batch = next(batches) if pairs is None else pairs(next(batches))
        loss, m = dmd.generator_loss(engines.generator, engines.fake_score, engines.teacher,
                                     take(batch), exit_index, dmd_cfg, rngs["noise"])
        flags.append(update(engines.generator, loss))
        metrics.update({f"generator/{k}": v for k, v in m.items()})
        metrics["generator/grad_norm"] = engines.generator.get_global_grad_norm()
        passes += exit_index + 1 + 1 + (1 if dmd_cfg.guidance == "samples" else 2)
    exit_index = dmd.draw_exit_index(rngs["exit"], n_steps)
    loss, m = dmd.critic_loss(engines.generator, engines.fake_score, take(next(batches)), exit_index, dmd_cfg,
                              rngs["noise"])
    flags.append(update(engines.fake_score, loss))
    metrics.update({f"critic/{k}": v for k, v in m.items()})
    metrics["critic/grad_norm"] = engines.fake_score.get_global_grad_norm()
    metrics["forward_passes"] = passes + exit_index + 1 + 1
    return metrics, all(bool(f) for f in flags), keys  # the flags are read after the last step (see `update`)


def keys_of_every_rank(keys: list[str]) -> list[list[str]]:
    """Collective: each rank's sample keys (called on every rank when a step is skipped)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, keys)
    return out


def data_counters(batches, device) -> tuple[int, int]:
    """Collective: corrupt samples and shard errors summed over the ranks."""
    counts = torch.tensor([batches.counters.corrupt_samples, batches.counters.shard_errors], device=device, dtype=torch.float64)
    dist.all_reduce(counts)
    return int(counts[0].item()), int(counts[1].item())


def schedule_learning_rates(step: int, engines, cfg: TrainConfig) -> dict[str, float]:
    """Both optimizers at their schedule's point for this step; {"generator": lr, "critic": lr} (the
    recipe's lr times the factor; per-tower groups keep their scales) for the log."""
    from distill.engines import set_learning_rates
    lr = {}
    for name, engine, optim in (("generator", engines.generator, cfg.generator_optim),
                                ("critic", engines.fake_score, cfg.critic_optim)):
        if engine is not None:
            factor = lr_factor(optim.schedule, step, cfg.max_steps)
            set_learning_rates(engine.optimizer, optim, factor)
            lr[name] = optim.lr * factor
    return lr


def scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if v is None:
            continue
        out[k] = v.item() if torch.is_tensor(v) else float(v)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, ds_config, plan = prepare(args)
    except (ConfigError, ValueError, FileNotFoundError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE

    import deepspeed
    from tqdm import tqdm

    from distill.data import DataError, PairBatches, build_loader
    from distill.engines import build_engines

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=int(os.environ.get("DEEPSPEED_TIMEOUT", 60))))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", args.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if plan is not None:
        if rank == 0:
            for note in checkpoint.apply_resume_plan(out, plan):
                print(f"resume: {note}", flush=True)
        dist.barrier()  # nobody saves before the cut-short and damaged checkpoints are out of the way

    engines = build_engines(cfg, ds_config)
    dmd_cfg = cfg.dmd
    batches = build_loader(args.data, cfg, rank, world)
    pairs = PairBatches(cfg.data.pairs, cfg, rank, world) if cfg.data.pairs else None
    rngs = {"noise": torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + rank),
            "exit": torch.Generator().manual_seed(cfg.seed)}
    state = {"step": 0, "generator_updates": 0, "skipped_nonfinite": 0}
    fault_hooks.install(engines, lambda: state["step"])
    if plan is not None and (path := plan.path) is not None:
        trainer_state, rank_state = checkpoint.load(path, engines)
        state = {k: trainer_state[k] for k in state}
        checkpoint.set_rng_state(rank_state["rng"], rngs)
        share_exit_rng(rngs["exit"])
        batches.load_state_dict(rank_state["data"])
        if pairs is not None:
            pairs.load_state_dict(rank_state["pairs"])
        if rank == 0:
            print(f"resumed from {path} at step {state['step']}", flush=True)

    log = MetricsLog(out, to_dict(cfg), rank, cfg.log.wandb_mode, cfg.log.wandb_project, cfg.log.run_name, resume=args.resume)
    stop = StopFlag()
    nonfinite_in_a_row = 0
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=rank != 0, desc=cfg.objective, dynamic_ncols=True)

    def save():
        rank_state = {"rng": checkpoint.rng_state(rngs), "data": batches.state_dict(),
                      **({"pairs": pairs.state_dict()} if pairs is not None else {})}
        trainer_state = {**state, "config": to_dict(cfg), "world_size": world}
        return checkpoint.save(out, state["step"], engines, trainer_state, rank_state, cfg.keep_checkpoints)

    exit_code = 0
    while state["step"] < cfg.max_steps:
        step = state["step"]
        t0 = time.perf_counter()
        generator_step = cfg.objective == "dmd" and dmd.is_generator_step(step, dmd_cfg)
        faults.reach("step_start", step)
        lr = schedule_learning_rates(step, engines, cfg)
        try:
            metrics, ok, keys = train_step(step, engines, batches, pairs, dmd_cfg, rngs, device, cfg)
        except DataError as err:  # every shard of this rank unreadable: stop instead of waiting forever
            print(f"error: rank {rank}: {err}", file=sys.stderr, flush=True)
            # The other ranks wait in this step's collectives: no barrier or clean shutdown can
            # pair with them. Exiting lets the launcher end the job.
            os._exit(EXIT_DATA)
        skipped_keys = None
        if ok:
            nonfinite_in_a_row = 0
            if generator_step or cfg.objective == "flow":
                state["generator_updates"] += 1
                if engines.ema is not None:
                    engines.ema.update(step)
        else:
            nonfinite_in_a_row += 1
            state["skipped_nonfinite"] += 1
            skipped_keys = keys_of_every_rank(keys)
            if rank == 0:
                held = "; ".join(f"rank {r}: {', '.join(k)}" for r, k in enumerate(skipped_keys))
                print(f"warning: step {step} skipped (NaN/Inf loss); its batches held {held}", file=sys.stderr, flush=True)
            if nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                print(f"error: {nonfinite_in_a_row} steps in a row with NaN/Inf losses; stopping", file=sys.stderr)
                exit_code = EXIT_NONFINITE
                break
        state["step"] = step + 1
        seconds = time.perf_counter() - t0
        log_now = step % cfg.log.every == 0 or step + 1 == cfg.max_steps
        if log_now:
            corrupt_samples, shard_errors = data_counters(batches, device)  # collective: every rank
        if rank == 0 and log_now:
            values = scalars(metrics)
            values.update({"step_time_s": seconds, "samples_per_s": cfg.data.batch_size * world / seconds,
                           **{f"lr/{name}": value for name, value in lr.items()},
                           "skipped_nonfinite": state["skipped_nonfinite"], "finite": ok,
                           "data/corrupt_samples": corrupt_samples, "data/shard_errors": shard_errors})
            log.log(step, values, notes=None if skipped_keys is None else {"skipped_keys": skipped_keys})
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k.endswith("loss") and math.isfinite(v)})
        bar.update(1)
        preempted = stop.any_rank(device)
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.max_steps or preempted:
            path = save()
            if rank == 0:
                bar.write(f"saved {path}")
        if preempted:
            if rank == 0:
                bar.write(f"preemption signal: saved at step {state['step']}, exiting for requeue")
            exit_code = EXIT_PREEMPTED
            break
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # a late preemption signal must not kill the shutdown
        signal.signal(sig, signal.SIG_IGN)
    bar.close()
    log.close()
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
