"""LM quality: softmax vs exact polynomial vs PolySketch on character-level text.

Trains the same GPT (same data order, steps and schedule) with each attention
variant and each seed (--seeds: the model's initial key and the data order)
and writes, under --out-dir (stem --tag, default lm_quality_ctx{T}):

  <stem>.json   every run: val loss, params, steps/s, tokens/s, histories
  <stem>.md     per variant over the seeds: mean val loss, spread, parameters,
                step time; then every run
  <stem>.png    validation loss curves (mean over seeds, min-max band)

  JAX_PLATFORMS=cpu python bench/lm_quality.py --context 512 --steps 300
  JAX_PLATFORMS=cpu python bench/lm_quality.py --context 1024 --seeds 0 1 2 \
      --variants softmax,learned+local,random+local,softmax-wide --wide-dim 160

--polynomial-warmup N [N ...] trains each PolySketch variant once per N: its
first N steps with exact polynomial attention, then the sketch
(TrainConfig.polynomial_warmup_steps; 0, the default: from scratch), a row
per value:

  JAX_PLATFORMS=cpu python bench/lm_quality.py --context 1024 --steps 250 \
      --variants softmax,learned+local --polynomial-warmup 0 50

Each run is written as soon as it finishes, so a cut-short run keeps what it
has; --resume skips the runs already in the JSON; --merge A.json B.json writes
the runs of reports of the same settings as one (a job per core, merged). --variants picks a subset
(names below); "softmax-wide" is softmax at --wide-dim (e.g. the width that
gives it the learned sketch's extra parameters).

On an accelerator, --parallel runs every (variant, seed) as its own process at
once (small models leave most of a GPU idle from one process), each writing
<stem>_parts/<variant>_s<seed>.{json,log}, and merges them into <stem>.
--time-budget SECONDS (with --parallel) first calibrates: every job compiles,
waits for the others (a file barrier, so all time their steps under the same
contention) and times --calibrate-steps train steps and one eval batch; then
--steps (the cap) is lowered, where the budget needs it, to the largest
multiple of 50 that the slowest job fits in 90% of what is left, the same for
every run:

  XLA_FLAGS=--xla_gpu_autotune_level=0 python bench/lm_quality.py --parallel \\
      --time-budget 370 --steps 3000 --context 1024 --batch-size 16 --layers 4 --heads 4 \\
      --dim 256 --lr 3e-3 --warmup 100 --num-evals 10 --eval-batches 4 --seeds 0 1 2 \\
      --variants softmax,learned+local,random+local    # bench/LM_QUALITY.md, on an H200

Compiling many jobs at once with XLA's GPU autotuning on took minutes (it times candidate kernels on the shared GPU):
hence the flag above. But on one GPU, --parallel does not pay for models this
small (measured on an H200, LM_QUALITY.md): processes side by side time-slice
it, and autotuning off costs 3-4x per step. There, run one process at a time
with autotuning on (bench/gpu_quality_run.sh). --stack-seeds trains a
variant's seeds at once, vmapped in one process (1.25-1.3x the seed-steps/s of
one seed per process, measured with autotuning off).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

from pallas_polysketch.models.gpt import GPTConfig
from pallas_polysketch.train import TextData, TrainConfig, make_optimizer, make_steps, train

PROCESS_START = time.time()

# name -> (attention, sketch, local_exact)
VARIANTS = {
    "softmax": ("softmax", "learned", True),
    "polynomial": ("polynomial", "learned", True),
    "learned+local": ("polysketch", "learned", True),
    "random+local": ("polysketch", "random", True),
    "learned": ("polysketch", "learned", False),
    "random": ("polysketch", "random", False),
    "local": ("polysketch", "none", True),    # exact local blocks alone: what the sketch adds
    "softmax-wide": ("softmax", "learned", True),  # at --wide-dim
}
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                            "shared", "data", "tinyshakespeare.txt")


def polynomial_warmup_steps(run):
  """A run's exact polynomial warm-up steps (runs written before the flag: 0)."""
  return run.get("polynomial_warmup", 0)


def variant_label(variant, warmup):
  """A variant's name in tables and plots: "learned+local, polynomial warm-up 50"."""
  return f"{variant}, polynomial warm-up {warmup}" if warmup else variant


def run_label(run):
  return (variant_label(run["variant"], polynomial_warmup_steps(run))
          + (f", sketch hidden width {run['sketch_hidden']}" if run.get("sketch_hidden") else ""))


def run_key(run):
  """What tells runs apart: variant, seed, warm-up and the learned sketch's
  hidden width (--sketch-hidden; absent: the default 8r)."""
  return run["variant"], run["seed"], polynomial_warmup_steps(run), run.get("sketch_hidden")


def has_learned_sketch(variant):
  attention, sketch, _ = VARIANTS[variant]
  return attention == "polysketch" and sketch == "learned"


def sketch_hidden(args, variant):
  """--sketch-hidden where the variant's model has a learned sketch, else None."""
  return getattr(args, "sketch_hidden", None) if has_learned_sketch(variant) else None


# per run, so reports that differ in them merge (the rows say which)
PER_RUN_FLAGS = ("data", "sketch_hidden")
PER_RUN_MODEL = ("sketch_hidden_dim",)


def summarise(runs):
  """Per variant and warm-up (in first-seen order): mean, std and range of the
  final val loss over seeds."""
  out = {}
  for r in runs:
    out.setdefault(run_label(r), []).append(r)
  rows = []
  for name, rs in out.items():
    vals = np.array([r["val_loss"] for r in rs])
    rows.append(dict(variant=name, base_variant=rs[0]["variant"],
                     polynomial_warmup=polynomial_warmup_steps(rs[0]),
                     seeds=[r["seed"] for r in rs], n=len(rs),
                     mean=float(vals.mean()), std=float(vals.std(ddof=1)) if len(rs) > 1 else 0.0,
                     lo=float(vals.min()), hi=float(vals.max()), params=rs[0]["params"],
                     embed_dim=rs[0]["embed_dim"],
                     step_ms=float(np.median([1e3 / r["steps_per_s"] for r in rs])),
                     tokens_per_s=float(np.median([r["tokens_per_s"] for r in rs])),
                     attention=rs[0]["attention"], sketch=rs[0]["sketch"],
                     local_exact=rs[0]["local_exact"]))
  return rows


def write_table(path, runs, header):
  rows = summarise(runs)
  soft = next((r["mean"] for r in rows if r["variant"] == "softmax"), None)
  lines = [header, "",
           "| variant | attention | sketch | local_exact | width | params | seeds | mean val loss "
           "| std | min .. max | vs softmax mean | ms/step | tokens/s |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
  for r in rows:
    rel = f"{100 * (r['mean'] / soft - 1):+.2f}%" if soft else "n/a"
    sk = r["sketch"] if r["attention"] == "polysketch" else "-"
    le = str(r["local_exact"]) if r["attention"] == "polysketch" else "-"
    lines.append(f"| {r['variant']} | {r['attention']} | {sk} | {le} | {r['embed_dim']} | "
                 f"{r['params']:,} | {r['n']} | {r['mean']:.4f} | {r['std']:.4f} | "
                 f"{r['lo']:.4f} .. {r['hi']:.4f} | {rel} | {r['step_ms']:.0f} | "
                 f"{r['tokens_per_s']:,.0f} |")
  lines += ["", "Every run (val loss: at the last step; lowest: the lowest of its evaluations):", "",
            "| variant | seed | val loss | lowest (step) | steps/s | wall s |",
            "|---|---:|---:|---:|---:|---:|"]
  for r in runs:
    h = r["history"]
    best = int(np.argmin(h["val_loss"]))
    lines.append(f"| {run_label(r)} | {r['seed']} | {r['val_loss']:.4f} | "
                 f"{h['val_loss'][best]:.4f} ({h['val_step'][best]}) | "
                 f"{r['steps_per_s']:.3f} | {r['wall_s']:.0f} |")
  if runs[0].get("devices"):
    lines += ["", f"Devices: {runs[0]['devices']}."]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(path, runs, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  by = {}
  for r in runs:
    by.setdefault(run_label(r), []).append(r)
  for i, (name, rs) in enumerate(by.items()):
    color = f"C{i}"
    for j, r in enumerate(rs):
      h = r["history"]
      axes[0].plot(h["step"], h["train_loss"], color=color, alpha=0.7, lw=1,
                   label=name if j == 0 else None)
    steps = rs[0]["history"]["val_step"]
    curves = np.array([r["history"]["val_loss"][:len(steps)] for r in rs
                       if len(r["history"]["val_loss"]) >= len(steps)])
    axes[1].plot(steps, curves.mean(0), marker="o", color=color, label=f"{name} (n={len(curves)})")
    if len(curves) > 1:
      axes[1].fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2)
  axes[0].set_title("train loss (mean over log window), every seed")
  axes[1].set_title("validation loss: mean over seeds, min-max band")
  for ax in axes:
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def model_config(args, data, name):
  attention, sketch, local_exact = VARIANTS[name]
  dim = args.wide_dim if name == "softmax-wide" else args.dim
  return GPTConfig(vocab_size=data.vocab_size, num_layers=args.layers, num_heads=args.heads,
                   embed_dim=dim, attention=attention, sketch=sketch,
                   sketch_dim=args.sketch_dim, block_size=args.block_size,
                   local_exact=local_exact, sketch_hidden_dim=sketch_hidden(args, name))


def train_config(args, seed, polynomial_warmup=0):
  eval_every = (max(1, args.steps // args.num_evals) if args.num_evals else args.eval_every)
  return TrainConfig(steps=args.steps, batch_size=args.batch_size, context=args.context,
                     learning_rate=args.lr, warmup_steps=args.warmup, seed=seed,
                     eval_every=eval_every, eval_batches=args.eval_batches, log_every=10,
                     polynomial_warmup_steps=polynomial_warmup)


def takes_warmup(variant):
  """Whether a polynomial warm-up applies: PolySketch variants only."""
  return VARIANTS[variant][0] == "polysketch"


def warmups(args, variant):
  """--polynomial-warmup's values for a PolySketch variant; [0] for the others."""
  return args.polynomial_warmup if takes_warmup(variant) else [0]


def config_meta(mc, cfg):
  """The model and training settings every run of a report shares ("*": per run)."""
  return (dataclasses.asdict(mc) | {"attention": "*", "sketch": "*", "local_exact": "*",
                                    "embed_dim": "*"},
          dataclasses.asdict(cfg) | {"seed": "*", "polynomial_warmup_steps": "*"})


def write_outputs(stem, args, command, runs, meta_configs, data_path, *, fitted=None,
                  not_finished=()):
  """<stem>.json, .md and .png of `runs` (meta_configs: config_meta's pair).

  fitted: --time-budget's step cap, fitted steps, calibration seconds and the
  seconds left after it. not_finished: the runs that did not finish (named in
  the table's header and the JSON)."""
  variants = args.variants.split(",")
  model_meta, train_meta = meta_configs
  pw = [w for w in args.polynomial_warmup if w]
  header = (f"Context {args.context}, {args.layers} layers x {args.heads} heads x {args.dim} dims"
            + (f" (softmax-wide: {args.wide_dim})" if "softmax-wide" in variants else "")
            + f", sketch_dim {args.sketch_dim}"
            + (f" (hidden {args.sketch_hidden})" if args.sketch_hidden is not None else "")
            + f", block {args.block_size}, batch {args.batch_size}, "
            f"{args.steps} steps ({args.steps * args.batch_size * args.context:,} tokens), "
            f"lr {args.lr}, seeds {args.seeds}; val loss on "
            f"{args.eval_batches * args.batch_size * args.context:,} held-out chars, "
            f"every {train_meta['eval_every']} steps. "
            + (f"PolySketch variants with polynomial warm-ups of {args.polynomial_warmup} "
               "steps (that many first steps, and their evaluations, with exact polynomial "
               "attention; 0: none; steps/s counts the sketched steps). " if pw else "")
            + (f"--time-budget: calibrated in {fitted['calibration_s']:.0f} s, "
               f"{fitted['steps']} of at most {fitted['steps_cap']} steps fitted in the "
               f"{fitted['seconds_left']:.0f} s left. " if fitted else "")
            + (f"**Not finished: {', '.join(not_finished)}.** " if not_finished else "")
            + f"Command: `{command}`")
  meta = {"command": command, "args": vars(args), "fitted": fitted,
          "not_finished": list(not_finished),
          "model": model_meta, "train": train_meta,
          "data": os.path.basename(data_path), "platform": sys.platform,
          "devices": runs[0].get("devices"), "summary": summarise(runs), "results": runs}
  with open(stem + ".json", "w") as f:
    json.dump(meta, f, indent=1)
  write_table(stem + ".md", runs, header)
  plot(stem + ".png", runs, f"{os.path.basename(data_path)}, context {args.context}, "
       f"{args.layers}L/{args.heads}H/{args.dim}d, {args.steps} steps, seeds {args.seeds}")


def device_description():
  import jax
  d = jax.devices()[0]
  return f"{len(jax.devices())} x {d.platform} {getattr(d, 'device_kind', '')}, jax {jax.__version__}"


# ----------------------------------------------------------------------------
# --stack-seeds: every seed of a variant in one process, vmapped.
# ----------------------------------------------------------------------------


def stacked_steps(mc, cfgs):
  """One model and optimizer per config of `cfgs` (they differ in seed only),
  their states stacked on a leading axis, and train()'s jitted steps vmapped
  over it. Returns (state, train_step, eval_step, params per model); eval_step
  takes one batch shared by every model."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from pallas_polysketch.models.gpt import GPT, param_count
  states = []
  for cfg in cfgs:
    model = GPT(mc, rngs=nnx.Rngs(cfg.seed))
    _, state, train_step, eval_step = make_steps(model, make_optimizer(model, cfg))
    states.append(state)
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  eval_all = jax.jit(lambda state, *batch: jax.vmap(lambda st: eval_step(st, *batch))(state))
  return state, jax.jit(jax.vmap(train_step)), eval_all, param_count(model)


def stacked_batch(data, rngs, cfg):
  """Each model's next batch from its own RNG (as train() draws it), stacked."""
  batches = [data.train_batch(rng, cfg.batch_size, cfg.context) for rng in rngs]
  return [np.stack(parts) for parts in zip(*batches)]


def train_stacked(mc, data, cfgs):
  """train() for every config of `cfgs` (seeds of one variant) at once: the
  same batches, schedule and evaluations per seed, in one process
  (`stacked_steps`). A GPU then runs one program with S times the work per
  kernel instead of time-slicing S processes. Returns train()'s results dict per
  seed; steps_per_s is the stacked step's rate and tokens_per_s each seed's
  tokens at that rate."""
  if any(c.polynomial_warmup_steps for c in cfgs):
    raise ValueError("train_stacked has no polynomial warm-up; use train()")
  cfg = cfgs[0]
  if any(dataclasses.replace(c, seed=cfg.seed) != cfg for c in cfgs):
    raise ValueError("train_stacked: the configs may differ in seed only")
  state, train_step, eval_step, params = stacked_steps(mc, cfgs)
  rngs = [np.random.default_rng(c.seed) for c in cfgs]
  val = data.val_batches(cfg.eval_batches, cfg.batch_size, cfg.context)
  histories = [{"step": [], "train_loss": [], "val_step": [], "val_loss": [], "val_acc": []}
               for _ in cfgs]
  evals = [[] for _ in cfgs]
  window, eval_window = [], []
  train_time, timed_steps = 0.0, 0
  t_start = time.perf_counter()
  for step in range(1, cfg.steps + 1):
    batch = stacked_batch(data, rngs, cfg)
    t0 = time.perf_counter()
    state, loss, _ = train_step(state, *batch)
    loss = np.asarray(loss)
    if step > 1:   # the first step compiles
      train_time += time.perf_counter() - t0
      timed_steps += 1
    if not np.isfinite(loss).all():
      raise FloatingPointError(f"loss is {loss} at step {step}")
    window.append(loss)
    eval_window.append(loss)
    if step % cfg.log_every == 0 or step == cfg.steps:
      for h, x in zip(histories, np.mean(window, 0)):
        h["step"].append(step)
        h["train_loss"].append(float(x))
      window = []
    if step % cfg.eval_every == 0 or step == cfg.steps:
      out = [eval_step(state, *b) for b in val]
      vloss = np.mean([np.asarray(l) for l, _ in out], 0)
      vacc = np.mean([np.asarray(a) for _, a in out], 0)
      elapsed = time.perf_counter() - t_start
      for i, (h, e) in enumerate(zip(histories, evals)):
        h["val_step"].append(step)
        h["val_loss"].append(float(vloss[i]))
        h["val_acc"].append(float(vacc[i]))
        e.append({"step": step, "train_loss": float(np.mean(eval_window, 0)[i]),
                  "val_loss": float(vloss[i]), "val_acc": float(vacc[i]), "elapsed_s": elapsed})
      eval_window = []
      print(f"step {step}: val " + " ".join(f"{x:.4f}" for x in vloss)
            + f"  {elapsed:.1f}s", flush=True)
  steps_per_s = timed_steps / train_time if timed_steps else float("nan")
  return [{"val_loss": h["val_loss"][-1], "val_acc": h["val_acc"][-1],
           "steps_per_s": steps_per_s,
           "tokens_per_s": steps_per_s * cfg.batch_size * cfg.context,
           "elapsed_s": time.perf_counter() - t_start, "params": params, "history": h,
           "evals": e, "stacked_seeds": len(cfgs)} for h, e in zip(histories, evals)]


# ----------------------------------------------------------------------------
# --parallel and --time-budget: one process per (variant, seed).
# ----------------------------------------------------------------------------

RUN_FLAGS = ("data", "context", "steps", "batch_size", "layers", "heads", "dim", "wide_dim",
             "sketch_dim", "sketch_hidden", "block_size", "lr", "warmup", "eval_every", "eval_batches",
             "num_evals")


def job_tag(variant, seeds):
  return f"{variant}_s{'-'.join(str(s) for s in seeds)}"


def job_argv(args, variant, seeds, tag, out_dir):
  """The command line of one job, a variant's seeds (several: stacked): every
  run flag of `args`."""
  argv = []
  for name in RUN_FLAGS:
    value = getattr(args, name)
    if value is not None:
      argv += ["--" + name.replace("_", "-"), str(value)]
  return (argv + ["--variants", variant, "--seeds"] + [str(s) for s in seeds]
          + (["--stack-seeds"] if len(seeds) > 1 else [])
          + ["--tag", tag, "--out-dir", out_dir])


def job_env(num_jobs):
  """Jobs share one accelerator: none preallocates its memory (each takes what it
  needs; jobs of different variants need different amounts)."""
  env = dict(os.environ)
  if num_jobs > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  return env


def run_jobs(jobs, out_dir, extra_argv, args, *, deadline=None, stop_on_failure=False,
             poll_s=1.0, report_every_s=30.0):
  """Runs each (variant, seeds) job as a process of this script; returns the
  return codes in job order. Past `deadline` (time.time()) the jobs still running
  are killed (None or a negative code), and so they are once one fails if
  stop_on_failure. Every report_every_s, the last line of each log."""
  os.makedirs(out_dir, exist_ok=True)
  script = os.path.abspath(__file__)
  procs = []
  try:
    for variant, seeds in jobs:
      tag = job_tag(variant, seeds)
      log = open(os.path.join(out_dir, tag + ".log"), "w")
      cmd = [sys.executable, script] + job_argv(args, variant, seeds, tag, out_dir) + extra_argv
      procs.append((tag, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=job_env(len(jobs))), log))
    _wait(procs, deadline, stop_on_failure, poll_s, report_every_s)
  finally:   # no job outlives this call (an interrupt, a failure, the deadline)
    codes = []
    for tag, p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
        codes.append(None)
      else:
        codes.append(p.returncode)
      log.close()
  for (tag, _, log), code in zip(procs, codes):
    if code != 0:
      print(f"job {tag} ended with {code}; its log ends:\n{tail(log.name, 30)}", flush=True)
  return codes


def _wait(procs, deadline, stop_on_failure, poll_s, report_every_s):
  last_report = time.time()
  while any(p.poll() is None for _, p, _ in procs):
    if deadline is not None and time.time() > deadline:
      for tag, p, _ in procs:
        if p.poll() is None:
          print(f"deadline: killing {tag}", flush=True)
          p.kill()
      break
    if stop_on_failure and any(p.poll() not in (None, 0) for _, p, _ in procs):
      break
    if time.time() - last_report > report_every_s:
      last_report = time.time()
      for tag, _, log in procs:
        print(f"  {tag}: {last_line(log.name)}", flush=True)
    time.sleep(poll_s)


def last_line(path):
  lines = [l for l in tail(path, 5).splitlines() if l.strip()]
  return lines[-1][:160] if lines else "(no output yet)"


def tail(path, n):
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-n:])


def fit_steps(calibration, budget_s, *, max_steps, num_evals, eval_batches, multiple=50,
              margin=0.9):
  """max_steps if every job fits them in margin * budget_s, else the largest
  multiple of `multiple` steps that it fits: a job costs startup_s + compile_s + steps * step_s
  + num_evals * eval_batches * eval_s (its calibrated times). Raises ValueError
  if not even `multiple` steps fit."""
  def fits(c):
    fixed = c["startup_s"] + c["compile_s"] + num_evals * eval_batches * c["eval_s"]
    return (margin * budget_s - fixed) / c["step_s"]

  slow = min(calibration, key=fits)
  if fits(slow) >= max_steps:
    return max_steps
  steps = int(fits(slow) // multiple) * multiple
  if steps < multiple:
    raise ValueError(f"time budget {budget_s:.0f} s fits fewer than {multiple} steps (slowest "
                     f"job {slow['variant']}: {slow['step_s'] * 1e3:.1f} ms/step, "
                     f"{slow['compile_s']:.0f} s to compile)")
  return steps


def arrive(barrier_dir, tag, phase, count, *, while_waiting=None, timeout_s=1800):
  """A file barrier: marks `tag` at `phase`, then waits (calling while_waiting,
  or sleeping) until `count` jobs have."""
  open(os.path.join(barrier_dir, f"{tag}.{phase}"), "w").close()
  t0 = time.time()
  while len(glob.glob(os.path.join(barrier_dir, f"*.{phase}"))) < count:
    if time.time() - t0 > timeout_s:
      raise TimeoutError(f"barrier: fewer than {count} jobs at {phase!r} after {timeout_s} s")
    if while_waiting is None:
      time.sleep(0.05)
    else:
      while_waiting()


def calibrate(args, data, variant, seeds, out_path):
  """One job's calibration: compile (train and eval step), wait at the barrier,
  time --calibrate-steps train steps and one eval batch; writes JSON. The job's
  seeds step as train_stacked() steps them (one seed: a stack of one, the cost
  of train()'s step)."""
  mc = model_config(args, data, variant)
  cfgs = [train_config(args, seed) for seed in seeds]
  rngs = [np.random.default_rng(seed) for seed in seeds]
  state, train_step, eval_step, _ = stacked_steps(mc, cfgs)
  startup_s = time.time() - PROCESS_START

  def step():
    nonlocal state
    state, loss, _ = train_step(state, *stacked_batch(data, rngs, cfgs[0]))
    np.asarray(loss)   # train() syncs on every step too

  t0 = time.perf_counter()
  step()
  val = data.val_batches(1, cfgs[0].batch_size, cfgs[0].context)[0]
  np.asarray(eval_step(state, *val)[0])
  compile_s = time.perf_counter() - t0
  tag = job_tag(variant, seeds)
  arrive(args.barrier, tag, "ready", args.barrier_count)
  t0 = time.perf_counter()
  for _ in range(args.calibrate_steps):
    step()
  step_s = (time.perf_counter() - t0) / args.calibrate_steps
  t0 = time.perf_counter()
  np.asarray(eval_step(state, *val)[0])
  eval_s = time.perf_counter() - t0
  # Keep the accelerator as busy as in the real run until every job has timed
  # its steps: a fast job that stopped would make the slow ones look faster.
  arrive(args.barrier, tag, "timed", args.barrier_count, while_waiting=step)
  record = dict(variant=variant, seeds=list(seeds), startup_s=startup_s, compile_s=compile_s,
                step_s=step_s, eval_s=eval_s, calibrate_steps=args.calibrate_steps,
                devices=device_description())
  with open(out_path, "w") as f:
    json.dump(record, f, indent=1)
  print(json.dumps(record), flush=True)
  return record


def run_parallel(args, data, stem, command):
  """--parallel (and --time-budget): returns the merged runs."""
  t_start = time.time()
  if args.stack_seeds:
    jobs = [(v, tuple(args.seeds)) for v in args.variants.split(",")]
  else:
    jobs = [(v, (s,)) for s in args.seeds for v in args.variants.split(",")]
  parts = stem + "_parts"
  calibration = fitted = None
  if args.time_budget:
    calib_dir = os.path.join(parts, "calibrate")
    os.makedirs(calib_dir, exist_ok=True)
    for phase in ("ready", "timed"):   # barrier files of an earlier run
      for f in glob.glob(os.path.join(calib_dir, f"*.{phase}")):
        os.remove(f)
    codes = run_jobs(jobs, calib_dir, ["--calibrate-steps", str(args.calibrate_steps),
                                       "--barrier", calib_dir, "--barrier-count", str(len(jobs))],
                     args, deadline=t_start + args.time_budget,
                     stop_on_failure=True)  # the others would wait at the barrier
    if any(c != 0 for c in codes):
      raise SystemExit(f"calibration failed (return codes {codes})")
    calibration = []
    for variant, seeds in jobs:
      with open(os.path.join(calib_dir, job_tag(variant, seeds) + ".json")) as f:
        calibration.append(json.load(f))
    left = args.time_budget - (time.time() - t_start)
    # train() evaluates every eval_every steps and at the last: at most one more.
    num_evals = (args.num_evals or -(-args.steps // args.eval_every)) + 1
    steps_cap = args.steps
    args.steps = fit_steps(calibration, left, max_steps=args.steps, num_evals=num_evals,
                           eval_batches=args.eval_batches)
    fitted = dict(steps_cap=steps_cap, steps=args.steps,
                  calibration_s=time.time() - t_start, seconds_left=left)
    print(f"calibrated ({fitted['calibration_s']:.0f} s, {left:.0f} s left): --steps "
          f"{args.steps} (cap {steps_cap})", flush=True)
    for c in calibration:
      print(f"  {c['variant']:14s} seeds {c['seeds']}: {c['step_s'] * 1e3:7.1f} ms/step under "
            f"contention, compile {c['compile_s']:.0f} s, startup {c['startup_s']:.0f} s, "
            f"eval batch {c['eval_s'] * 1e3:.0f} ms", flush=True)
  deadline = t_start + args.time_budget if args.time_budget else None
  codes = run_jobs(jobs, parts, [], args, deadline=deadline)
  runs = []
  for (variant, seeds), code in zip(jobs, codes):
    path = os.path.join(parts, job_tag(variant, seeds) + ".json")
    if code == 0 and os.path.exists(path):
      with open(path) as f:
        runs += json.load(f)["results"]
  missing = [f"{v} seed {s}" for (v, seeds), c in zip(jobs, codes) if c != 0 for s in seeds]
  if missing:
    print(f"not finished: {missing}", flush=True)
  if runs:
    for r in runs:
      r["calibration"] = next((c for c in calibration or []
                               if c["variant"] == r["variant"] and r["seed"] in c["seeds"]),
                              None)
    write_outputs(stem, args, command, runs,
                  config_meta(model_config(args, data, "softmax"), train_config(args, 0)),
                  args.data, fitted=fitted, not_finished=missing)
  return runs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=DEFAULT_DATA)
  p.add_argument("--context", type=int, default=512)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--wide-dim", type=int, default=None, help="width of the softmax-wide variant")
  p.add_argument("--sketch-dim", type=int, default=32)
  p.add_argument("--sketch-hidden", type=int, default=None,
                 help="the learned sketch's hidden width (default 8 x --sketch-dim, the paper's)")
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--num-evals", type=int, default=None,
                 help="evaluate every steps // N steps (instead of --eval-every)")
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "softmax-wide"))
  p.add_argument("--tag", default=None, help="output stem (default lm_quality_ctx<context>)")
  p.add_argument("--resume", action="store_true", help="skip the runs already in <stem>.json")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  p.add_argument("--parallel", action="store_true",
                 help="one process per (variant, seed), all at once, merged at the end")
  p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                 help="with --parallel: calibrate, then lower --steps to what fits the budget")
  p.add_argument("--calibrate-steps", type=int, default=20,
                 help="timed train steps per job in the --time-budget calibration")
  p.add_argument("--stack-seeds", action="store_true",
                 help="train a variant's seeds at once in one process, vmapped (with "
                      "--parallel: one process per variant)")
  p.add_argument("--polynomial-warmup", type=int, nargs="+", default=[0], metavar="N",
                 help="PolySketch variants: train the first N steps with exact polynomial "
                      "attention, then the sketch (TrainConfig.polynomial_warmup_steps); "
                      "several values: a run for each (0: none)")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="merge these reports' runs (same settings) into <stem>; trains nothing")
  p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)   # calibration jobs
  p.add_argument("--barrier-count", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  variants = args.variants.split(",")
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
  if "softmax-wide" in variants and args.wide_dim is None:
    p.error("--variants softmax-wide needs --wide-dim")
  if args.time_budget is not None and not args.parallel:
    p.error("--time-budget needs --parallel")
  if args.time_budget is not None and args.time_budget <= 0:
    p.error(f"--time-budget must be positive, got {args.time_budget}")
  if args.parallel and args.resume:
    p.error("--resume does not combine with --parallel")
  if args.num_evals is not None and args.num_evals < 1:
    p.error(f"--num-evals must be >= 1, got {args.num_evals}")
  bad = [w for w in args.polynomial_warmup if not 0 <= w < args.steps]
  if bad:
    p.error(f"--polynomial-warmup must be in [0, --steps = {args.steps}), got {bad}")
  if len(set(args.polynomial_warmup)) != len(args.polynomial_warmup):
    p.error(f"--polynomial-warmup: repeated values {args.polynomial_warmup}")
  if any(args.polynomial_warmup) and args.merge is None and not any(map(takes_warmup, variants)):
    p.error(f"--polynomial-warmup applies to PolySketch variants, and --variants {args.variants} "
            "has none")
  if args.merge is not None and (args.parallel or args.resume or args.stack_seeds):
    p.error("--merge trains nothing: it does not combine with --parallel, --resume or "
            "--stack-seeds")
  if any(args.polynomial_warmup) and (args.stack_seeds or args.parallel):
    p.error("--polynomial-warmup runs one seed per run in this process: it does not "
            "combine with --stack-seeds or --parallel")
  command = " ".join(["python", "bench/lm_quality.py"]
                     + (argv if argv is not None else sys.argv[1:]))
  if args.merge is not None:
    return merge(p, args, command)
  if not os.path.exists(args.data):
    print(f"skipped: no data at {args.data} (pass --data PATH to a text file)")
    return []

  data = TextData.from_file(args.data)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, args.tag or f"lm_quality_ctx{args.context}")
  if args.barrier is not None:   # a --time-budget calibration job
    return calibrate(args, data, variants[0], args.seeds, stem + ".json")
  if args.parallel:
    return run_parallel(args, data, stem, command)
  runs = []
  if args.resume and os.path.exists(stem + ".json"):
    with open(stem + ".json") as f:
      runs = json.load(f)["results"]
  done = {run_key(r) for r in runs}
  todo = [(name, seed, w) for seed in args.seeds for name in variants
          for w in warmups(args, name)
          if (name, seed, w, sketch_hidden(args, name)) not in done]
  if args.stack_seeds:   # one stacked run per variant, of its seeds not done (no warm-up)
    groups = [(name, [s for v, s, _ in todo if v == name], 0) for name in variants]
    groups = [g for g in groups if g[1]]
  else:
    groups = [(name, [seed], w) for name, seed, w in todo]
  for name, seeds, warmup in groups:
    mc = model_config(args, data, name)
    cfgs = [train_config(args, seed, warmup) for seed in seeds]
    attention, sketch, local_exact = VARIANTS[name]
    print(f"=== {variant_label(name, warmup)} seed{'s' if len(seeds) > 1 else ''} "
          f"{' '.join(map(str, seeds))} ===", flush=True)
    t0 = time.time()
    load_before = os.getloadavg()
    if args.stack_seeds:
      results = train_stacked(mc, data, cfgs)
    else:
      results = [train(mc, data, cfgs[0], progress=False, log=lambda s: print(s, flush=True))[1]]
    for seed, res in zip(seeds, results):
      hidden = sketch_hidden(args, name)
      res.update(variant=name, seed=seed, polynomial_warmup=warmup, attention=attention,
                 sketch=sketch, **({"sketch_hidden": hidden} if hidden else {}),
                 local_exact=local_exact, embed_dim=mc.embed_dim, wall_s=time.time() - t0,
                 load_before=load_before, load_after=os.getloadavg(),
                 devices=device_description())
      runs.append(res)
      print(f"{variant_label(name, warmup)} seed {seed}: val {res['val_loss']:.4f}  {res['steps_per_s']:.3f} steps/s  "
            f"({res['wall_s']:.0f} s)", flush=True)
    write_outputs(stem, args, command, runs, config_meta(mc, cfgs[0]), args.data)
  return runs


def merge(p, args, command):
  """--merge: the runs of several reports of the same settings (run flags, model
  and training configs) in one report at <stem>; a later report's run replaces
  an earlier one of the same variant, seed and warm-up. Returns the runs."""
  reports = []
  for path in args.merge:
    if not os.path.exists(path):
      p.error(f"--merge: no report at {path}")
    with open(path) as f:
      reports.append((path, json.load(f)))
  for _, r in reports:   # runs written before they recorded their sketch's width
    for run in r["results"]:
      hidden = sketch_hidden(argparse.Namespace(**r["args"]), run["variant"])
      if hidden:
        run.setdefault("sketch_hidden", hidden)
  first_path, first = reports[0]
  model_meta = first["model"] | {k: "*" for k in PER_RUN_MODEL}
  train_meta = first["train"] | {"polynomial_warmup_steps": "*"}
  for path, r in reports[1:]:
    differ = sorted([f"--{k.replace('_', '-')}" for k in RUN_FLAGS
                     if k not in PER_RUN_FLAGS and r["args"].get(k) != first["args"].get(k)]
                    + [name for name in ("data", "devices") if r.get(name) != first.get(name)]
                    + [f"model.{k}" for k in model_meta.keys() | r["model"].keys()
                       if k not in PER_RUN_MODEL and r["model"].get(k) != model_meta.get(k)]
                    + [f"train.{k}" for k in train_meta.keys() | r["train"].keys()
                       if k != "polynomial_warmup_steps" and r["train"].get(k) != train_meta.get(k)])
    if differ:
      p.error(f"--merge: {path} differs from {first_path} in {differ}")
  by_key = {}
  for _, r in reports:
    for run in r["results"]:
      by_key[run_key(run)] = run
  runs = list(by_key.values())
  widths = {run.get("sketch_hidden") for run in runs if has_learned_sketch(run["variant"])}
  merged = argparse.Namespace(**(first["args"] | {
      "sketch_hidden": widths.pop() if len(widths) == 1 else None,   # several: in the rows
      "variants": ",".join(dict.fromkeys(run["variant"] for run in runs)),
      "seeds": sorted({run["seed"] for run in runs}),
      "polynomial_warmup": sorted({polynomial_warmup_steps(run) for run in runs})}))
  stem = os.path.join(args.out_dir, args.tag or f"lm_quality_ctx{merged.context}")
  merged_runs = {f"{run['variant']} seed {run['seed']}" for run in runs}
  not_finished = list(dict.fromkeys(x for _, r in reports for x in r.get("not_finished", [])
                                    if x not in merged_runs))
  write_outputs(stem, merged, command, runs, (model_meta, train_meta), first["data"],
                not_finished=not_finished)
  print(f"merged {len(runs)} runs of {len(reports)} reports into {stem}.json", flush=True)
  return runs


if __name__ == "__main__":
  main()
