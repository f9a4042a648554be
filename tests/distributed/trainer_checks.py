"""Run by tests/test_train.py on 2 CPU ranks: the three ZeRO-3 engines of the trainer.

Checks (results written per rank as JSON): which engine gets gradients in a generator and a
critic step, forward passes per step through the real engines, the teacher stays bit-identical,
the EMA (tracking, then averaging) against a reference, the exported EMA file against the
gathered generator weights, and that `objective: flow` lowers the loss on a fixed batch.
"""
import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad, safe_get_local_fp32_param, safe_get_local_grad

from distill import checkpoint, dmd, export
from distill.config import load_config
from distill.data import build_loader
from distill.engines import build_engines
from distill.models import OviFusion, load_ovi_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("--data")
parser.add_argument("--out")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
ds_config = json.loads(Path("ds_configs/zero3_cpu.json").read_text())
out = Path(args.out)
result = {"rank": rank}


def gathered(module) -> dict[str, torch.Tensor]:
    state = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            state[name] = p.data.detach().clone().float()
    return state


def local_grads(engine) -> list:
    grads = [safe_get_local_grad(p) for p in engine.module.parameters()]
    return [None if g is None else g.float().clone() for g in grads]


def grad_change(engine, before: list) -> float:
    """How much this engine's local gradient partitions changed since `before` (DeepSpeed keeps
    the last step's gradients until the next backward, so compare rather than test for zero)."""
    change = 0.0
    for g, b in zip(local_grads(engine), before):
        if g is None and b is None:
            continue
        g = torch.zeros_like(b) if g is None else g
        b = torch.zeros_like(g) if b is None else b
        change = max(change, (g - b).abs().max().item())
    return change


def counting(engines, batch_size: int) -> list:
    """(engine, grad) once per forward pass of the batch: a call at k times the batch (the stacked
    teacher's conditional + negative passes) counts k."""
    calls = []
    for name in ("generator", "fake_score", "teacher"):
        getattr(engines, name).module.register_forward_pre_hook(
            lambda mod, inp, name=name: calls.extend([(name, torch.is_grad_enabled())] * (inp[0].shape[0] // batch_size)))
    return calls


# -- DMD engines ------------------------------------------------------------------------------
cfg = load_config("distill/configs/tiny.yaml", ["ema.start_step=1000000", "dmd.slg_block=1"])
engines = build_engines(cfg, ds_config)
batches = build_loader(args.data, cfg, rank, world)
rng = torch.Generator().manual_seed(100 + rank)
teacher_before = gathered(engines.teacher.module)
calls = counting(engines, cfg.data.batch_size)
teacher_calls = []
engines.teacher.module.register_forward_pre_hook(lambda mod, inp: teacher_calls.append(inp[0].shape[0]))

gen_steps, critic_steps = [], []
for step, exit_index in enumerate([2, 0, 3]):
    calls.clear()
    teacher_calls.clear()
    grads_g, grads_f = local_grads(engines.generator), local_grads(engines.fake_score)
    loss, _ = dmd.generator_loss(engines.generator, engines.fake_score, engines.teacher, next(batches),
                                 exit_index, cfg.dmd, rng)
    engines.generator.backward(loss)
    gen_steps.append({"exit": exit_index, "calls": list(calls), "teacher_call_batches": list(teacher_calls), "generator_grad": grad_change(engines.generator, grads_g),
                      "fake_grad": grad_change(engines.fake_score, grads_f)})
    engines.generator.step()
    engines.ema.update(step)
    calls.clear()
    grads_g, grads_f = local_grads(engines.generator), local_grads(engines.fake_score)
    loss, _ = dmd.critic_loss(engines.generator, engines.fake_score, next(batches), exit_index, cfg.dmd, rng)
    engines.fake_score.backward(loss)
    critic_steps.append({"exit": exit_index, "calls": list(calls), "generator_grad": grad_change(engines.generator, grads_g),
                         "fake_grad": grad_change(engines.fake_score, grads_f)})
    engines.fake_score.step()
result["generator_steps"], result["critic_steps"] = gen_steps, critic_steps

# While the EMA only tracks (before start_step), the exported EMA must equal the generator's weights:
# this checks the reassembly of ZeRO-3 partitions from the per-rank shard files.
generator_now = gathered(engines.generator.module)
state = {"step": 3, "generator_updates": 3, "skipped_nonfinite": 0, "config": {"model": {"variant": "tiny"}}}
rank_state = {"rng": checkpoint.rng_state({"noise": rng}), "data": batches.state_dict()}
checkpoint.save(out / "run", 3, engines, state, rank_state, keep=2)
if rank == 0:
    path = export.export(out / "run", out / "student.safetensors")
    student = OviFusion(OviFusion.from_variant("tiny").cfg)
    load_ovi_checkpoint(student, path)  # strict, official key set
    result["export_vs_generator_max_diff"] = max(
        (student.state_dict()[k].float() - generator_now[k].bfloat16().float()).abs().max().item() for k in generator_now)

# Averaging: after start_step the EMA lerps towards the fp32 master weights; compare with a reference.
engines.ema.start_step = 0
reference = [s.clone() for s in engines.ema.shards]
initial = [s.clone() for s in engines.ema.shards]
for step in range(3, 6):
    loss, _ = dmd.generator_loss(engines.generator, engines.fake_score, engines.teacher, next(batches), 1, cfg.dmd, rng)
    engines.generator.backward(loss)
    engines.generator.step()
    engines.ema.update(step)
    current = [safe_get_local_fp32_param(p) for p in engines.generator.module.parameters()]
    reference = [torch.lerp(r, c, 1 - cfg.ema.decay) for r, c in zip(reference, current)]
result["ema_moved"] = max((e - i).abs().max().item() for e, i in zip(engines.ema.shards, initial))
result["ema_vs_reference"] = max((e - r).abs().max().item() for e, r in zip(engines.ema.shards, reference))
result["ema_vs_weights"] = max((e - c).abs().max().item() for e, c in zip(engines.ema.shards, current))
# model.teacher_sharding=replicated: a plain whole copy gives the ZeRO-3 teacher's outputs (SLG pass too).
from distill.engines import engine_configs, replicated_teacher

replicated = replicated_teacher(cfg, engine_configs(ds_config, cfg)["teacher"])
probe = next(batches)
t = torch.full((probe.size,), 700.0)
with torch.no_grad():
    pairs = [(engines.teacher(probe.video, probe.audio, t, probe.text, probe.text, skip_block=skip),
              replicated(probe.video, probe.audio, t, probe.text, probe.text, skip_block=skip)) for skip in (None, 1)]
result["replicated_teacher_max_diff"] = max((a - b).abs().max().item() for za, zb in pairs for a, b in zip(za, zb))
teacher_after = gathered(engines.teacher.module)
result["teacher_max_change"] = max((teacher_after[k] - teacher_before[k]).abs().max().item() for k in teacher_before)
result["generator_changed"] = max((generator_now[k] - teacher_before[k]).abs().max().item() for k in teacher_before)
del engines

# -- ZeRO-3 leaf modules (whole attention / MLP fetches) give the per-Linear engine's gradients ------
from distill.engines import build_trained_engine

leaf_grads = []
for leaf in ("true", "false"):
    leaf_cfg = load_config("distill/configs/tiny.yaml", [f"model.zero3_leaf_modules={leaf}"])
    engine = build_trained_engine(leaf_cfg, engine_configs(ds_config, leaf_cfg)["generator"], leaf_cfg.generator_optim)
    for _ in range(2):  # the second pass runs with DeepSpeed's recorded trace (prefetching)
        loss, _ = dmd.flow_loss(engine, probe, leaf_cfg.dmd, torch.Generator().manual_seed(3))
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.optimizer.zero_grad()
    leaf_grads.append(grads)
    del engine
result["leaf_modules_grad_max_diff"] = max((leaf_grads[0][k] - leaf_grads[1][k]).abs().max().item() for k in leaf_grads[0])

# -- objective: flow ----------------------------------------------------------------------------
flow_cfg = load_config("distill/configs/tiny.yaml", ["objective=flow", "generator_optim.lr=1e-3", "ema.enabled=false"])
flow = build_engines(flow_cfg, ds_config)
assert flow.fake_score is None and flow.teacher is None
batch = next(build_loader(args.data, flow_cfg, rank, world))


def eval_flow() -> float:
    with torch.no_grad():
        losses = [dmd.flow_loss(flow.generator, batch, flow_cfg.dmd, torch.Generator().manual_seed(s))[0].item() for s in range(4)]
    return sum(losses) / len(losses)


before = eval_flow()
train_rng = torch.Generator().manual_seed(7 + rank)
for _ in range(25):
    loss, _ = dmd.flow_loss(flow.generator, batch, flow_cfg.dmd, train_rng)
    flow.generator.backward(loss)
    flow.generator.step()
result["flow_before"], result["flow_after"] = before, eval_flow()

(out / f"result.rank{rank}.json").write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
