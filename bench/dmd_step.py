"""DMD step speed and memory with the real trainer pieces: three DeepSpeed ZeRO-3 engines built
by distill/engines.py (full Ovi width, `--layers` fused blocks per tower, random weights, bf16),
generator and critic steps from distill/dmd.py on synthetic latents at 720² (15,004 video tokens)
and 704×1280 (27,280) + 157 audio tokens, `--batches` samples per GPU.

    torchrun --nproc_per_node 2 bench/dmd_step.py --layers 8 --batches 1 2 --teacher both --out dmd_step.json
    torchrun --nproc_per_node 2 bench/dmd_step.py --smoke      # CPU, tiny width: checks the script

Diagnostics: --comm-test (NCCL bandwidth), --reference (the same blocks without DeepSpeed, at
each grid and batch), --breakdown (per-phase seconds, synced), --profile DIR (torch.profiler +
cProfile tables; --profile-rows N: only the first N rows), --sync-check (every host sync of one
generator and one critic step, counted per call site, CUDA only),
--per-linear-fetch (DeepSpeed's default fetch units instead of whole attention/MLP modules),
--stack-teacher off|on|both (the teacher's two passes apart / as one forward at 2B / time each),
--ds-config FILE (another DeepSpeed JSON; the row records its zero_optimization section),
--deepcompile fake_score|generator|both (DeepSpeed's DeepCompile on those engines; with DeepSpeed
0.19.8 and torch 2.11 it fails in every form tried, with and without --per-linear-fetch: bench/RESULTS.md).

Steps go through the trainer's own `update` (distill/train.py: the NaN guard, backward, step).
Exit index 0 makes the step's passes match the three-engine probe's (generator: 3 no-grad
forwards + one checkpointed fwd+bwd = 7 forward-equivalents; critic: 1 + 4 = 5), so achieved
TFLOP/s (hardware FLOPs incl. recompute, per GPU) compare directly. The mean over the random
exit index (1.5 extra no-grad student forwards) is reported too.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed
import torch
import torch.distributed as dist

from distill import dmd
from distill.batch import Batch
from distill.config import load_config
from distill.engines import build_engines, engine_configs, replicated_teacher
from distill.train import update

GRIDS = {"720x720": (31, 44, 44), "704x1280": (31, 44, 80)}
AUDIO, TEXT = 157, 512


def fused_block_flops(n_v, n_a, d=3072, d_ff=14336, l_t=TEXT):
    def branch(n_x, n_o):
        return 2 * n_x * (6 * d * d + 2 * d * d_ff) + 4 * d * d * (l_t + n_o) + 4 * d * n_x * (n_x + l_t + n_o)
    return branch(n_v, n_a) + branch(n_a, n_v)


def synthetic_batch(grid, text_len, text_dim, device, dtype, batch=1) -> Batch:
    f, h, w = grid
    g = torch.Generator(device=device).manual_seed(dist.get_rank())
    video = torch.randn(batch, 48, f, h, w, generator=g, device=device, dtype=dtype)
    text = lambda: torch.randn(batch, text_len, text_dim, generator=g, device=device, dtype=dtype)
    return Batch(video=video, audio=torch.randn(batch, AUDIO, 20, generator=g, device=device, dtype=dtype),
                 text=text(), neg_text_video=text(), neg_text_audio=text(), image_latent=video[:, :, :1])


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseClock:
    """Seconds per phase of a step, with a device sync around each phase (so phases lose their
    overlap: use for the breakdown only, never for the headline step time)."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextmanager
    def phase(self, name):
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.seconds[name] += time.perf_counter() - t0

    def wrap(self, model, name):
        def call(*args, **kwargs):
            with self.phase(f"{name} fwd{'' if torch.is_grad_enabled() else ' (no grad)'}"):
                return model(*args, **kwargs)
        return call


def comm_test(device) -> dict:
    """Collective bandwidth between the GPUs: all-gather and reduce-scatter of bf16 buffers of the
    sizes ZeRO-3 moves (one Linear .. one bucket), as bytes of the gathered tensor per second."""
    world, out = dist.get_world_size(), {}
    for mib in (32, 256, 1024):
        numel = mib * 2**20 // 2
        full = torch.empty(numel, device=device, dtype=torch.bfloat16)
        part = torch.ones(numel // world, device=device, dtype=torch.bfloat16)
        for name, fn in (("all_gather", lambda: dist.all_gather_into_tensor(full, part)),
                         ("reduce_scatter", lambda: dist.reduce_scatter_tensor(part, full))):
            fn()
            seconds = timed(fn, 5)
            out[f"{name}_{mib}MiB_GBps"] = mib * 2**20 / seconds / 1e9
    return out


def plain_reference(layers, grid, device, iters, batch_size=1):
    """The same OviFusion blocks without DeepSpeed (one GPU, bf16, random weights, compiled
    element-wise ops): the time of a no-grad forward and of a checkpointed forward+backward,
    i.e. the compute a DMD step cannot avoid."""
    from distill.models import OviFusion, variant_config
    from distill.models.layers import compile_elementwise_ops
    compile_elementwise_ops()
    with torch.device("meta"):
        model = OviFusion(variant_config("960x960_5s", layers))
    model = model.to_empty(device=device).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.gradient_checkpointing = True
    batch = synthetic_batch(grid, model.cfg.video.text_len, model.cfg.video.text_dim, device, torch.bfloat16, batch_size)
    t = torch.full((batch_size,), 500.0, device=device)
    args = (batch.video, batch.audio, t, batch.text, batch.text)

    def forward():
        with torch.no_grad():
            model.eval()(*args, first_frame_clean=True)

    def forward_backward():
        v, a = model.train()(*args, first_frame_clean=True)
        (v.float().square().mean() + a.float().square().mean()).backward()
        model.zero_grad(set_to_none=True)

    out = {}
    for name, fn in (("forward_s", forward), ("forward_backward_ckpt_s", forward_backward)):
        fn()
        out[name] = timed(fn, iters)
    del model
    torch.cuda.empty_cache()
    return out


def _site(frame) -> str:
    path = frame.filename.replace("\\", "/")
    for root in ("/distill/", "/bench/", "/deepspeed/", "/torch/"):
        if root in path:
            path = root.strip("/") + "/" + path.split(root, 1)[1]
            break
    return f"{path}:{frame.lineno} ({frame.name})"


def host_syncs(fn) -> dict[str, int]:
    """Every synchronizing CUDA call fn makes (torch's sync debug mode), counted per call site:
    'innermost frame <- innermost frame of this repository'. Each one makes the host wait until
    the GPU has drained its queue, so the GPU then idles while the host issues the next kernels."""
    sites = Counter()
    repo = str(Path(__file__).resolve().parents[1])

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        ours = next((f for f in reversed(stack) if f.filename.startswith(repo)), None)
        sites[_site(stack[-1]) + (f" <- {_site(ours)}" if ours is not None and ours is not stack[-1] else "")] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(sites.most_common())


def sync_check(generator_step, critic_step, iters) -> dict:
    """Host syncs of one step of each kind, then the same with DeepSpeed's own single-rank fetch
    wait (distill/zero3_fetch.py undone), with both steps' times: the patch's effect in one process."""
    from distill import zero3_fetch
    out = {}
    for label, undo in (("", False), ("_deepspeed_wait", True)):
        if undo:
            zero3_fetch.restore_single_rank_fetch_sync()
        sync()
        out[f"host_syncs_generator_step{label}"] = host_syncs(lambda: generator_step(0))
        sync()
        out[f"host_syncs_critic_step{label}"] = host_syncs(lambda: critic_step(0))
        sync()
        if undo:
            out["generator_s_deepspeed_wait"] = timed(lambda: generator_step(0), iters)
            out["critic_s_deepspeed_wait"] = timed(lambda: critic_step(0), iters)
    zero3_fetch.skip_single_rank_fetch_sync()
    return out


CATEGORIES = (("nccl", ("nccl",)), ("attention", ("flash", "fmha", "cudnn", "attn", "sdpa")),
              ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "sm100")), ("triton", ("triton",)),
              ("copy/fill", ("memcpy", "memset", "copy", "fill", "cat")))


def kernel_categories(prof) -> dict[str, float]:
    """Device seconds per kernel category (nccl kernels run on their own streams, so the compute
    stream's busy time is the sum of the other categories)."""
    out = defaultdict(float)
    for evt in prof.key_averages():
        if evt.self_device_time_total <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if evt.key.startswith("nccl:") or "#" in evt.key:  # GPU-side annotations repeat their kernels' time
            continue
        name = evt.key.lower()
        category = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        out[category] += evt.self_device_time_total / 1e6
    return dict(out)


def _union_s(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e6  # profiler times are in µs


def gpu_timeline(prof) -> dict[str, float]:
    """Where the GPU's time went in one profiled step, from kernel intervals: busy with compute
    (anything but NCCL), busy with NCCL alone (exposed communication), and idle (no kernel at all:
    the CPU is late, e.g. hooks or launches, or a stream waits on an event)."""
    compute, comm = [], []
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA or "#" in evt.name or evt.name.startswith("nccl:"):
            continue
        (comm if "nccl" in evt.name.lower() else compute).append((evt.time_range.start, evt.time_range.end))
    if not compute:
        return {}
    both = compute + comm
    window = (max(b for _, b in both) - min(a for a, _ in both)) / 1e6
    busy, compute_busy = _union_s(both), _union_s(compute)
    return {"gpu_window_s": window, "compute_busy_s": compute_busy, "nccl_only_s": busy - compute_busy,
            "idle_s": window - busy}


def timed(fn, iters):
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="dmd_step.json")
    parser.add_argument("--smoke", action="store_true", help="tiny width on CPU, to check the script")
    parser.add_argument("--breakdown", action="store_true", help="per-phase seconds (synced) of one generator and one critic step")
    parser.add_argument("--profile", default=None, help="folder: torch.profiler + cProfile tables of one step of each kind (rank 0)")
    parser.add_argument("--reference", action="store_true", help="time the same blocks without DeepSpeed first")
    parser.add_argument("--profile-rows", type=int, default=None, help="with --profile: only the first N rows")
    parser.add_argument("--sync-check", action="store_true", help="count host syncs of one step of each kind (first row, CUDA)")
    parser.add_argument("--per-linear-fetch", action="store_true", help="model.zero3_leaf_modules=false")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="samples per GPU")
    parser.add_argument("--teacher", choices=["zero3", "replicated", "both"], default="zero3",
                        help="model.teacher_sharding; both: time the generator step with each")
    parser.add_argument("--stack-teacher", choices=["off", "on", "both"], default=None,
                        help="dmd.stack_teacher_passes for the generator step ('both': time each; default: the config's)")
    parser.add_argument("--no-random-exit", action="store_true", help="skip the random-exit (cycle) timings")
    parser.add_argument("--comm-test", action="store_true", help="measure all-gather / reduce-scatter bandwidth first")
    parser.add_argument("--ds-config", default=str(Path(__file__).resolve().parents[1] / "ds_configs/zero3.json"))
    parser.add_argument("--deepcompile", choices=["off", "fake_score", "generator", "both"], default="off",
                        help="experiment: DeepSpeed's DeepCompile (compile.deepcompile) on trained engines")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    variant = "tiny" if args.smoke else "960x960_5s"
    grids = {"smoke": (3, 4, 4)} if args.smoke else {k: GRIDS[k] for k in args.grids}
    reference, comm = {}, {}
    if args.comm_test and cuda:
        comm = comm_test(device)
        if rank == 0:
            print(json.dumps({"comm": comm}), flush=True)
    if args.reference and cuda:
        for (name, grid), batch_size in [(g, b) for g in grids.items() for b in args.batches]:
            reference[name, batch_size] = plain_reference(args.layers, grid, device, args.iters, batch_size)
            if rank == 0:
                print(json.dumps({"plain_reference": name, "batch_per_gpu": batch_size, **reference[name, batch_size]}), flush=True)
    cfg = load_config(None, [f"model.variant={variant}", "model.random_init=true", f"model.num_layers={args.layers}",
                             "ema.enabled=true", "dmd.slg_block=1", "log.wandb_mode=disabled",
                             f"model.teacher_sharding={'replicated' if args.teacher == 'replicated' else 'zero3'}",
                             f"model.zero3_leaf_modules={str(not args.per_linear_fetch).lower()}",
                             *([f"dmd.stack_teacher_passes={str(args.stack_teacher == 'on').lower()}"]
                               if args.stack_teacher in ("on", "off") else [])])
    ds_config = json.loads(Path(args.ds_config).read_text())
    if args.deepcompile != "off":
        ds_config["compile"] = {"deepcompile": True}
    engines = build_engines(cfg, ds_config)
    for name in ("generator", "fake_score"):  # graph-level ZeRO-3: fetches scheduled in the compiled graph, no module hooks
        if args.deepcompile in (name, "both"):
            getattr(engines, name).compile()
    teachers = {cfg.model.teacher_sharding: engines.teacher}
    if args.teacher == "both":
        teachers["replicated"] = replicated_teacher(cfg, engine_configs(ds_config, cfg)["teacher"])
    params = sum(p.ds_numel for p in engines.generator.module.parameters())
    text_len, text_dim = engines.generator.module.cfg.video.text_len, engines.generator.module.cfg.video.text_dim
    rng = torch.Generator(device=device).manual_seed(rank)
    results = {"world": world, "layers": args.layers, "ds_config": ds_config["zero_optimization"], "params_per_model": params, "comm": comm,
               "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": []}
    for (name, grid), batch_size in [(g, b) for g in grids.items() for b in args.batches]:
        batch = synthetic_batch(grid, text_len, text_dim, device, torch.bfloat16, batch_size)
        n_v, n_a = grid[0] * grid[1] * grid[2] // 4, AUDIO
        forward = batch_size * args.layers * fused_block_flops(n_v, n_a) if not args.smoke else 1.0

        def generator_step(exit_index, teacher=engines.teacher, dmd_cfg=cfg.dmd):
            loss, _ = dmd.generator_loss(engines.generator, engines.fake_score, teacher, batch, exit_index, dmd_cfg, rng)
            if bool(update(engines.generator, loss)):  # read after the step, as the trainer does
                engines.ema.update(10**9)

        def critic_step(exit_index):
            loss, _ = dmd.critic_loss(engines.generator, engines.fake_score, batch, exit_index, cfg.dmd, rng)
            bool(update(engines.fake_score, loss))

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for k in range(4) if not results["rows"] else (0, 3):  # warm-up: compiled kernels, trace caches, allocator
            generator_step(k)
            critic_step(k)
        gen = timed(lambda: generator_step(0), args.iters)
        critic = timed(lambda: critic_step(0), args.iters)
        if args.no_random_exit:
            gen_mean = critic_mean = float("nan")
        else:
            gen_mean = sum(timed(lambda: generator_step(k), 1) for k in range(4)) / 4     # exit index ~ U{0..3}
            critic_mean = sum(timed(lambda: critic_step(k), 1) for k in range(4)) / 4
        row = {"world": world, "device": results["device"], "layers": args.layers, "grid": name, "zero3_leaf_modules": cfg.model.zero3_leaf_modules, "deepcompile": args.deepcompile,
               "stack_teacher_passes": cfg.dmd.stack_teacher_passes, "video_tokens": n_v, "batch_per_gpu": batch_size, "teacher": cfg.model.teacher_sharding,
               "generator_s": gen, "critic_s": critic,
               "generator_tflops_per_gpu": 7 * forward / gen / 1e12, "critic_tflops_per_gpu": 5 * forward / critic / 1e12,
               "generator_s_random_exit": gen_mean, "critic_s_random_exit": critic_mean,
               "cycle_s": gen_mean + 5 * critic_mean,  # 1 generator + 5 critic updates
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}
        if args.stack_teacher == "both":  # the other layout of the teacher's two passes, same engines
            other_cfg = replace(cfg.dmd, stack_teacher_passes=not cfg.dmd.stack_teacher_passes)
            generator_step(0, dmd_cfg=other_cfg)
            key = "stacked" if other_cfg.stack_teacher_passes else "separate"
            row[f"generator_s_{key}_teacher"] = timed(lambda: generator_step(0, dmd_cfg=other_cfg), args.iters)
            row[f"generator_tflops_per_gpu_{key}_teacher"] = 7 * forward / row[f"generator_s_{key}_teacher"] / 1e12
        if "replicated" in teachers and args.teacher == "both":
            other = teachers["replicated"]
            generator_step(0, other)
            row["generator_s_replicated_teacher"] = timed(lambda: generator_step(0, other), args.iters)
            row["generator_tflops_per_gpu_replicated_teacher"] = 7 * forward / row["generator_s_replicated_teacher"] / 1e12
            row["cycle_s_replicated_teacher"] = gen_mean - gen + row["generator_s_replicated_teacher"] + 5 * critic_mean
        if (name, batch_size) in reference:
            ref = reference[name, batch_size]
            row["plain_generator_s"] = 3 * ref["forward_s"] + ref["forward_backward_ckpt_s"]
            row["plain_critic_s"] = ref["forward_s"] + ref["forward_backward_ckpt_s"]
            row["generator_ratio_to_reference"] = row["plain_generator_s"] / gen
            row["critic_ratio_to_reference"] = row["plain_critic_s"] / critic
        if args.sync_check and cuda and not results["rows"]:
            try:  # a diagnostic: its failure must not cost the row
                row.update(sync_check(generator_step, critic_step, args.iters))
            except Exception as err:  # noqa: BLE001
                row["sync_check_error"] = f"{type(err).__name__}: {err}"
        if args.breakdown:
            clock = PhaseClock()
            g, f, t = engines.generator, engines.fake_score, engines.teacher
            for _ in range(args.iters):
                with clock.phase("generator step total"):
                    loss, _ = dmd.generator_loss(clock.wrap(g, "G"), clock.wrap(f, "F"), clock.wrap(t, "R"), batch, 0, cfg.dmd, rng)
                    with clock.phase("G backward"):
                        g.backward(loss)
                    with clock.phase("G optimizer step"):
                        g.step()
                    with clock.phase("EMA update"):
                        engines.ema.update(10**9)
                with clock.phase("critic step total"):
                    loss, _ = dmd.critic_loss(clock.wrap(g, "G"), clock.wrap(f, "F"), batch, 0, cfg.dmd, rng)
                    with clock.phase("F backward"):
                        f.backward(loss)
                    with clock.phase("F optimizer step"):
                        f.step()
            row["breakdown_s"] = {k: v / args.iters for k, v in clock.seconds.items()}
        if args.profile and (args.profile_rows is None or len(results["rows"]) < args.profile_rows):
            folder = Path(args.profile)
            folder.mkdir(parents=True, exist_ok=True)
            for kind, fn in (("generator", lambda: generator_step(0)), ("critic", lambda: critic_step(0))):
                fn()
                sync()
                activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                with torch.profiler.profile(activities=activities) as prof:
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    wall = time.perf_counter() - t0
                profiler = cProfile.Profile()
                profiler.enable()
                fn()
                sync()
                profiler.disable()
                if rank == 0:
                    row[f"{kind}_kernel_s"] = {"wall_s": wall, **kernel_categories(prof)} if cuda else {"wall_s": wall}
                    row[f"{kind}_timeline_s"] = gpu_timeline(prof) if cuda else {}
                    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40)
                    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                    stats = io.StringIO()
                    pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(40)
                    pstats.Stats(profiler, stream=stats).sort_stats("cumulative").print_stats(60)
                    (folder / f"{name}_b{batch_size}_{kind}_kernels.txt").write_text(table + "\n\n" + cpu_table)
                    (folder / f"{name}_b{batch_size}_{kind}_python.txt").write_text(stats.getvalue())
        results["rows"].append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
