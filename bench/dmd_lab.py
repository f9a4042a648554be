"""A plain-PyTorch DMD loop on the toy world, for studying the method fast on a CPU.

    python bench/dmd_lab.py --seed 3 --cfg 2 --dmd-steps 800 --out /tmp/lab/s3_cfg2 [--set dmd.field=value ...]
    python bench/dmd_lab.py --select /tmp/lab 300      # the variant of DIR/<variant>_s<seed>_c<cfg>/ that wins (select())

The same loss functions as the trainer (distill/dmd.py: rollout, generator_loss, critic_loss,
flow_loss), the same OviFusion, AdamW with the trainer's parameter groups and clipping, the same
EMA rule; what it leaves out is DeepSpeed and the shard reader (batches are drawn i.i.d. from a
fixed dataset of the world), so a DMD run of 800 steps takes minutes on one core instead of an
hour. Results from here are leads; bench/toyworld.py (the real trainer, under DeepSpeed)
is the measurement that counts.

Every `--eval-every` steps it samples the EMA student and reports, per class and in the mean,
the Fréchet distance to the truth and to teacher@50's own (guided) samples, the feature means,
and the anatomy of the DMD gradient against σ: the size of its distribution-matching part
(fake − cond) and of its CFG part ((w − 1)(cond − uncond)), and their cosine.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import toyworld as tw
from bench import toyworld_metrics as tm
from distill import dmd
from distill.batch import Batch
from distill.config import load_config
from distill.engines import param_groups, set_learning_rates
from distill.schedules import lr_factor
from distill.flow import add_noise
from distill.models import OviFusion, init_weights, variant_config
from distill.sampling import TeacherSamplerConfig, sample_student, sample_teacher

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEFAULT_OVERRIDES = [  # the gpu size's DMD settings (bench/toyworld.py SIZES["gpu"])
    "generator_optim.lr=3e-5", "generator_optim.lr_scale_video=4.0", "generator_optim.lr_scale_audio=0.25",
    "critic_optim.lr=4e-4", "dmd.critic_ratio=5", "dmd.renoise=implied",
    "dmd.student_sigmas=[1.0,0.75,0.5,0.25]", "ema.decay=0.95",
]


def adamw(model, optim) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay)


class Data:
    """A fixed dataset of the world (as toyworld.write_dataset: per_class clips of each class and
    as many null-prompt clips), served as i.i.d. batches."""

    def __init__(self, world: tw.WorldConfig, per_class: int, seed: int):
        classes = np.repeat(np.append(np.arange(world.num_classes), tw.NULL_CLASS), per_class)
        clips = tw.sample_world(world, classes, seed)
        prompts = tw.class_prompts(world)
        null = tw.null_prompt().expand(tw.VARIANT.text_len, -1)  # zeros: the CFG negative too
        text = torch.stack([null if k == tw.NULL_CLASS else prompts[k] for k in classes])
        self.video, self.audio, self.text = clips["video"].to(DEVICE), clips["audio"].to(DEVICE), text.to(DEVICE)
        self.neg = torch.zeros(1, tw.VARIANT.text_len, tw.TEXT_DIM, device=DEVICE)
        self.rng = torch.Generator().manual_seed(seed + 17)

    def batch(self, n: int) -> Batch:
        i = torch.randint(0, len(self.video), (n,), generator=self.rng).to(DEVICE)
        neg = self.neg.expand(n, -1, -1)
        return Batch(video=self.video[i], audio=self.audio[i], text=self.text[i], neg_text_video=neg, neg_text_audio=neg)


class Pairs:
    """Teacher pairs: noise and the guided teacher's 50-step sample from it, for prompts drawn as
    the data's (every class and the null prompt alike)."""

    def __init__(self, teacher, world, per_class: int, cfg_scale: float, slg, seed: int, chunk: int = 128):
        g = torch.Generator().manual_seed(seed)
        classes = np.repeat(np.append(np.arange(world.num_classes), tw.NULL_CLASS), per_class)
        prompts = tw.class_prompts(world)
        null = tw.null_prompt().expand(tw.VARIANT.text_len, -1)
        self.text = torch.stack([null if k == tw.NULL_CLASS else prompts[k] for k in classes]).to(DEVICE)
        n = len(classes)
        self.noise_video = torch.randn(n, tw.VIDEO_LATENT_CHANNELS, tw.FRAMES, tw.LATENT_H, tw.LATENT_W, generator=g).to(DEVICE)
        self.noise_audio = torch.randn(n, tw.AUDIO_LEN, tw.AUDIO_CHANNELS, generator=g).to(DEVICE)
        tcfg = TeacherSamplerConfig(steps=50, cfg_video=cfg_scale, cfg_audio=cfg_scale, slg_block=slg)
        videos, audios = [], []
        for i in range(0, n, chunk):
            neg = torch.zeros(min(chunk, n - i), tw.VARIANT.text_len, tw.TEXT_DIM, device=DEVICE)
            v, a = sample_teacher(teacher, self.noise_video[i:i + chunk], self.noise_audio[i:i + chunk],
                                  self.text[i:i + chunk], neg, neg, tcfg)
            videos.append(v.float()), audios.append(a.float())
        self.video, self.audio = torch.cat(videos), torch.cat(audios)
        self.rng = torch.Generator().manual_seed(seed + 1)

    def batch(self, n: int) -> Batch:
        i = torch.randint(0, len(self.video), (n,), generator=self.rng).to(DEVICE)
        neg = torch.zeros(n, tw.VARIANT.text_len, tw.TEXT_DIM, device=DEVICE)
        return Batch(video=self.video[i], audio=self.audio[i], text=self.text[i], neg_text_video=neg, neg_text_audio=neg,
                     noise_video=self.noise_video[i], noise_audio=self.noise_audio[i],
                     target_video=self.video[i], target_audio=self.audio[i])


class EMA:
    def __init__(self, model, decay: float, start_step: int):
        self.model, self.decay, self.start = copy.deepcopy(model).eval(), decay, start_step

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            if step < self.start:
                e.copy_(p)
            else:
                e.lerp_(p, 1 - self.decay)


def clip_and_step(model, opt, loss, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def train_teacher(data: Data, cfg, steps: int, batch: int, seed: int) -> OviFusion:
    model = init_weights(OviFusion(variant_config("tiny", 3)), seed=seed).to(DEVICE)
    optim = replace(cfg.generator_optim, lr=2e-3, betas=(0.9, 0.999), lr_scale_video=1, lr_scale_audio=1)
    opt = adamw(model, optim)
    ema = EMA(model, 0.99, steps // 2)
    flow_cfg = replace(cfg.dmd, flow_shift=3.0)
    rng = torch.Generator(DEVICE).manual_seed(seed * 7 + 1)
    for step in range(steps):
        loss, _ = dmd.flow_loss(model, data.batch(batch), flow_cfg, rng)
        clip_and_step(model, opt, loss, optim.grad_clip)
        ema.update(model, step)
    return ema.model


# ---------------------------------------------------------------------------------------------
# Evaluation


def sample_set(model, world, n, cfg_scale, slg, kind, sigmas, renoise, seed=7):
    prompts = tw.class_prompts(world)
    neg = torch.zeros(n, tw.VARIANT.text_len, tw.TEXT_DIM, device=DEVICE)
    out = {}
    for k in range(world.num_classes):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        nv = torch.randn(n, tw.VIDEO_LATENT_CHANNELS, tw.FRAMES, tw.LATENT_H, tw.LATENT_W, generator=g).to(DEVICE)
        na = torch.randn(n, tw.AUDIO_LEN, tw.AUDIO_CHANNELS, generator=g).to(DEVICE)
        text = prompts[k].expand(n, -1, -1).to(DEVICE)
        if kind == "student":
            gen = torch.Generator(DEVICE).manual_seed(seed * 1000 + k)
            v, a = sample_student(model, nv, na, text, sigmas=sigmas, generator=gen, renoise=renoise)
        else:
            tcfg = TeacherSamplerConfig(steps=kind, cfg_video=cfg_scale, cfg_audio=cfg_scale, slg_block=slg)
            v, a = sample_teacher(model, nv, na, text, neg, neg, tcfg)
        out[k] = {"video": v.float().cpu(), "audio": a.float().cpu()}
    return out


class Judge:
    """Features of the truth (standardiser) and of teacher@50's samples, per class."""

    def __init__(self, world, truth_per_class, reference, seed=12345):
        self.world = world
        truth = {k: tw.sample_world(world, np.full(truth_per_class, k), seed + k) for k in range(world.num_classes)}
        tf = {k: tw.features(t["video"], t["audio"], world.num_classes) for k, t in truth.items()}
        pooled = np.concatenate(list(tf.values()))
        self.std = tw.Standardiser(pooled.mean(0), pooled.std(0) + 1e-8)
        self.truth = {k: self.std(f) for k, f in tf.items()}
        self.reference = {k: self.std(self.raw(s)) for k, s in reference.items()}

    def raw(self, s):
        return tw.features(s["video"], s["audio"], self.world.num_classes)

    def __call__(self, samples) -> dict:
        fd_t, fd_r, means = [], [], []
        for k, s in samples.items():
            raw = self.raw(s)
            z = self.std(raw)
            fd_t.append(tm.frechet_distance(z, self.truth[k]))
            fd_r.append(tm.frechet_distance(z, self.reference[k]))
            means.append(raw.mean(0))
        return {"fd_truth": float(np.mean(fd_t)), "fd_ref": float(np.mean(fd_r)),
                "fd_truth_per_class": fd_t, "fd_ref_per_class": fd_r,
                "feature_means": np.mean(means, axis=0).round(3).tolist()}


@torch.no_grad()
def gradient_anatomy(student, fake, teacher, data: Data, cfg: dmd.DMDConfig, rng, n=128) -> list[dict]:
    """On one batch of student samples, at σ in bins: |fake − cond|, (w−1)|cond − uncond| and
    their cosine (the DM and CA parts of the DMD gradient), and the normaliser. Video only."""
    batch = data.batch(n)
    x0v, x0a = dmd.rollout(student, batch, cfg.n_steps - 1, cfg, torch.Generator(DEVICE).manual_seed(6), with_grad=False)
    rows = []
    for sigma in (0.1, 0.3, 0.5, 0.7, 0.9):
        s = torch.full((n,), sigma, dtype=torch.float64, device=DEVICE)
        xv = add_noise(x0v, torch.randn(x0v.shape, generator=rng).to(DEVICE), s)
        xa = add_noise(x0a, torch.randn(x0a.shape, generator=rng).to(DEVICE), s)
        fv, fa, _, _ = dmd.predict(fake, xv, xa, s, batch.text, batch.text, None)
        (cv, ca), (uv, ua) = dmd.teacher_predictions(teacher, xv, xa, s, batch, cfg)
        dm, guide = (fv - cv).double(), (cfg.cfg_video - 1) * (cv - uv).double()
        real = cv.double() + guide
        norm = (x0v.double() - real).abs().flatten(1).mean(1)
        rms = lambda x: float(x.pow(2).mean().sqrt())
        cos = torch.nn.functional.cosine_similarity(dm.flatten(1), -guide.flatten(1), dim=1).mean()
        rows.append({"sigma": sigma, "dm_rms": rms(dm), "ca_rms": rms(guide), "cos_dm_neg_ca": float(cos),
                     "normaliser": float(norm.mean())})
    return rows


# ---------------------------------------------------------------------------------------------


def save_atomic(obj, path: Path) -> None:
    """Lab runs of one seed share the cache: never let one read another's half-written file."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finetune_on_pairs(teacher, pairs: Pairs, cfg, steps: int, batch: int, lr: float, seed: int,
                      ema_decay: float = 0.0, decay: str = "constant") -> OviFusion:
    """The teacher fine-tuned by flow matching on the guided teacher's samples (the pairs' targets);
    ema_decay > 0: the EMA of its weights over the second half (as the teacher's own training);
    decay: the rate's schedule over the steps (constant | cosine | linear, to zero)."""
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    optim = replace(cfg.generator_optim, lr=lr, betas=(0.9, 0.999), lr_scale_video=1, lr_scale_audio=1,
                    schedule=replace(cfg.generator_optim.schedule, decay=decay, decay_steps=steps, min_ratio=0.0))
    opt = adamw(model, optim)
    ema = EMA(model, ema_decay, steps // 2) if ema_decay > 0 else None
    rng = torch.Generator(DEVICE).manual_seed(seed * 7919)
    for step in range(steps):
        set_learning_rates(opt, optim, lr_factor(optim.schedule, step, steps))
        loss, _ = dmd.flow_loss(model, pairs.batch(batch), replace(cfg.dmd, flow_shift=3.0), rng)
        clip_and_step(model, opt, loss, 1.0)
        if ema is not None:
            ema.update(model, step)
    return (ema.model if ema is not None else model).eval().requires_grad_(False)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    world = tw.WorldConfig(num_classes=3, seed=args.seed)
    cfg = load_config(None, ["model.variant=tiny", *DEFAULT_OVERRIDES,
                             f"dmd.cfg_video={args.cfg}", f"dmd.cfg_audio={args.cfg}",
                             f"dmd.slg_block={args.slg if args.slg is not None else 'null'}",
                             f"max_steps={max(args.dmd_steps, 1)}", f"ema.start_step={args.ema_start}", *args.set])
    data = Data(world, args.per_class, seed=args.seed * 31 + 1)
    teacher_id = f"seed{args.seed}_steps{args.flow_steps}_batch{args.batch}_n{args.per_class}"
    cache = Path(args.cache) / f"teacher_{teacher_id}.pt"
    t0 = time.time()
    if cache.exists():
        teacher = OviFusion(variant_config("tiny", 3))
        teacher.load_state_dict(torch.load(cache))
        teacher = teacher.to(DEVICE)
    else:
        teacher = train_teacher(data, cfg, args.flow_steps, args.batch, seed=args.seed)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({k: v.cpu() for k, v in teacher.state_dict().items()}, cache)
    teacher.eval().requires_grad_(False)
    print(f"teacher ready ({time.time() - t0:.0f} s)", flush=True)

    n = args.eval_per_class
    slg = args.slg
    sigmas = cfg.dmd.student_sigmas
    t50 = sample_set(teacher, world, n, args.cfg, slg, 50, sigmas, cfg.dmd.renoise)
    judge = Judge(world, args.truth_per_class, t50)
    report = {"args": vars(args), "config": {"dmd": asdict(cfg.dmd), "generator_optim": asdict(cfg.generator_optim),
                                             "critic_optim": asdict(cfg.critic_optim), "ema": asdict(cfg.ema)},
              "teacher@50": judge(t50), "teacher@4": judge(sample_set(teacher, world, n, args.cfg, slg, 4, sigmas, None)),
              "undistilled@4": judge(sample_set(teacher, world, n, args.cfg, slg, "student", sigmas, cfg.dmd.renoise)),
              "students": []}
    for name in ("teacher@50", "teacher@4", "undistilled@4"):
        r = report[name]
        print(f"{name:14s} fd_truth {r['fd_truth']:.3f} fd_ref {r['fd_ref']:.3f} means {r['feature_means']}", flush=True)

    pairs = None
    if cfg.dmd.regression_weight > 0 or args.real_score_steps > 0:
        pcache = Path(args.cache) / f"pairs_{teacher_id}_cfg{args.cfg}_slg{slg}_{args.pairs_per_class}.pt"
        if pcache.exists():
            pairs = torch.load(pcache, weights_only=False)
        else:
            t0 = time.time()
            pairs = Pairs(teacher, world, args.pairs_per_class, args.cfg, slg, seed=args.seed * 7 + 3)
            save_atomic(pairs, pcache)
            print(f"pairs ready ({time.time() - t0:.0f} s)", flush=True)
    real, dmd_cfg = teacher, cfg.dmd
    if args.real_score_steps > 0:
        # DMD against a score of the guided teacher's samples (no CFG at DMD time): the teacher
        # fine-tuned by flow matching on its own pairs' samples
        t0 = time.time()
        real = finetune_on_pairs(teacher, pairs, cfg, args.real_score_steps, args.batch, args.real_score_lr, args.seed,
                                 ema_decay=args.real_score_ema, decay=args.real_score_decay)
        dmd_cfg = replace(cfg.dmd, guidance="samples")
        r = judge(sample_set(real, world, n, 1.0, None, 50, sigmas, None))
        report["real_score@50"] = r
        print(f"real score ({time.time() - t0:.0f} s) @50 fd_truth {r['fd_truth']:.3f} fd_ref {r['fd_ref']:.3f} "
              f"means {r['feature_means']}", flush=True)
    init = real if args.init_from_real else teacher
    generator = copy.deepcopy(init).train().requires_grad_(True)
    fake = copy.deepcopy(init).train().requires_grad_(True)
    opt_g, opt_f = adamw(generator, cfg.generator_optim), adamw(fake, cfg.critic_optim)
    ema = EMA(generator, cfg.ema.decay, cfg.ema.start_step)
    rng = torch.Generator(DEVICE).manual_seed(args.seed * 100_003)
    exit_rng = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.dmd_steps):
        for opt, optim in ((opt_g, cfg.generator_optim), (opt_f, cfg.critic_optim)):
            set_learning_rates(opt, optim, lr_factor(optim.schedule, step, cfg.max_steps))
        if dmd.is_generator_step(step, cfg.dmd):
            k = dmd.draw_exit_index(exit_rng, cfg.dmd.n_steps)
            source = pairs if cfg.dmd.regression_weight > 0 else data
            loss, _ = dmd.generator_loss(generator, fake, real, source.batch(args.batch), k, dmd_cfg, rng)
            clip_and_step(generator, opt_g, loss, cfg.generator_optim.grad_clip)
            fake.zero_grad(set_to_none=True)
            ema.update(generator, step)
        k = dmd.draw_exit_index(exit_rng, cfg.dmd.n_steps)
        loss, _ = dmd.critic_loss(generator, fake, data.batch(args.batch), k, dmd_cfg, rng)
        clip_and_step(fake, opt_f, loss, cfg.critic_optim.grad_clip)
        if (step + 1) % args.eval_every == 0:
            student = ema.model
            r = judge(sample_set(student, world, n, args.cfg, slg, "student", sigmas, cfg.dmd.renoise))
            r["step"] = step + 1
            r["anatomy"] = gradient_anatomy(student, fake, teacher, data, cfg.dmd, torch.Generator().manual_seed(5))
            report["students"].append(r)
            print(f"step {step + 1:5d} ({time.time() - t0:.0f} s) fd_truth {r['fd_truth']:.3f} fd_ref {r['fd_ref']:.3f} "
                  f"means {r['feature_means']}", flush=True)
            print("   " + "  ".join(f"σ{a['sigma']}: dm {a['dm_rms']:.3f} ca {a['ca_rms']:.3f} cos {a['cos_dm_neg_ca']:+.2f}"
                                    for a in r["anatomy"]), flush=True)
            write_report(report, args.out)
    write_report(report, args.out)
    return report


def write_report(report: dict, out: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab.json").write_text(json.dumps(report, indent=1, default=str))


def select(root: Path, recipe_step: int) -> tuple[str, dict[str, float]]:
    """The variant (DIR/<variant>_s<seed>_c<cfg>/lab.json) with the lowest mean score over its runs,
    a run's score being max(FD at the recipe's step, FD at the last step) / teacher@4's FD, where FD is
    the setting's: to the truth without guidance, to teacher@50's samples with it. So a variant is
    judged by how far it beats the teacher's own 4 steps and is punished for drifting after the recipe.
    A variant with a missing or unfinished run is out."""
    runs: dict[str, list[float]] = {}
    expected: dict[str, int] = {}
    for path in sorted(root.glob("*/lab.json")):
        name = path.parent.name.rsplit("_s", 1)[0]
        expected[name] = expected.get(name, 0) + 1
        report = json.loads(path.read_text())
        key = "fd_truth" if report["args"]["cfg"] == 1 else "fd_ref"
        at = {r["step"]: r[key] for r in report["students"]}
        last = report["args"]["dmd_steps"]
        if recipe_step not in at or last not in at:
            continue
        runs.setdefault(name, []).append(max(at[recipe_step], at[last]) / report["teacher@4"][key])
    scores = {name: float(np.mean(v)) if len(v) == expected[name] else math.inf for name, v in runs.items()}
    return min(scores, key=scores.get), scores


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--select":
        root, step = Path(sys.argv[2]), int(sys.argv[3])
        best, scores = select(root, step)
        for name, score in sorted(scores.items(), key=lambda kv: kv[1]):
            print(f"# {name}: {score:.4f}", file=sys.stderr)
        print(best)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--slg", type=int, default=None, help="teacher block skipped in the negative pass (tiny: 0..2)")
    p.add_argument("--flow-steps", type=int, default=800)
    p.add_argument("--dmd-steps", type=int, default=800)
    p.add_argument("--ema-start", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--per-class", type=int, default=1024)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--pairs-per-class", type=int, default=256)
    p.add_argument("--eval-per-class", type=int, default=128)
    p.add_argument("--truth-per-class", type=int, default=2000)
    p.add_argument("--cache", default="/tmp/lab_cache")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--real-score-steps", type=int, default=0,
                   help="DMD against the teacher fine-tuned on its guided pairs for this many steps (0: the guided teacher)")
    p.add_argument("--real-score-lr", type=float, default=5e-4)
    p.add_argument("--real-score-ema", type=float, default=0.0, help="EMA decay of the fine-tune (0: raw weights)")
    p.add_argument("--real-score-decay", default="constant", choices=("constant", "cosine", "linear"),
                   help="the fine-tune's rate schedule, to zero over its steps")
    p.add_argument("--init-from-real", action="store_true", help="generator and fake score start from the real score")
    p.add_argument("--set", nargs="*", default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
