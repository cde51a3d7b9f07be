"""A GPT-2-small training step on TPU, modelled from static schedules (issue 13 §6).

    step(T) = rest(T) + layers x attention(T)

attention(T): the static cycles of one attention op's VJP (forward + backward)
at B=1, 12 heads, H=64 from `bench/tpu_schedule.py`'s table: PolySketch
(kernels + the XLA ops around them, r=32, b=256, exact local blocks) or the
anchor (the faster of splash and flash attention per kernel). Both columns
come from the same JSON (`--schedule`).

rest(T): everything else in the training step, compiled for the generation on
this host (libtpu) and counted from its bundle dump the way
`tpu_schedule.summarise_program` counts XLA programs (every run of a kernel the
compiler dumped once counted): the GPT of `pallas_polysketch.models.gpt` with
its attention op replaced by a stub (o = q + k + v, plus the features' row sums
for PolySketch so their gradients flow), embedding, LayerNorms, projections,
rotary embedding, the shared q/k LayerNorm, the learned sketch's features and
their backward (PolySketch), the MLP, the tied 50304-way output and its
cross-entropy, the backward, and an AdamW update with global-norm clipping, in
bf16 with f32 parameters. The stub's own ops stay in: a small overcount on
both sides.

Compiled at two layer counts and two lengths (the program must fit the
generation's HBM; the logits alone are 4 x 50304 bytes per token):
rest(L, T) = a + b L + c T + d L T, solved exactly from the four compiles
(every part of the step is per token or per parameter), then read at L = 12
and any T.

  python bench/gpt_step.py --gens v5e v6e
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_schedule  # noqa: E402

GPT2_SMALL = dict(vocab_size=50304, num_heads=12, embed_dim=768, mlp_ratio=4,
                  sketch="learned", sketch_dim=32, degree=4, block_size=256,
                  local_exact=True, rope=True)
LAYERS = 12
COMPILE_LAYERS = (1, 2)
COMPILE_SEQS = (2048, 8192)
ATTENTIONS = ("polysketch", "softmax")
REPORT_SEQS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
PAPER = ("Kacham, Mirrokni & Zhong (ICML 2024) report, measured on TPUs at 32k: "
         "2x over the fastest FlashAttention (ICML version) to 2.5-4x (earlier versions)")


def step_fn(sds, job):
  """(fn, abstract args) of one training step with the attention stubbed."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from pallas_polysketch import nn as ps_nn
  from pallas_polysketch.models.gpt import GPT, GPTConfig

  cfg = GPTConfig(num_layers=job["layers"], attention=job["attention"],
                  **{**GPT2_SMALL, **job.get("config", {})})

  def polysketch_stub(q, k, v, fq, fk, **_):
    rows = (jnp.sum(fq.astype(jnp.float32), -1, keepdims=True)
            + jnp.sum(fk.astype(jnp.float32), -1, keepdims=True))
    return (q + k + v + rows.astype(q.dtype)).astype(q.dtype)

  def softmax_stub(q, k, v, **_):
    return q + k + v

  ps_nn.polysketch_attention = polysketch_stub
  jax.nn.dot_product_attention = softmax_stub
  model = nnx.eval_shape(lambda: GPT(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  graphdef, params, others = nnx.split(model, nnx.Param, ...)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1))
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, tokens, targets):
    def loss(p):
      logits = nnx.merge(graphdef, p, others)(tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  to_sds = lambda a: sds(a.shape, a.dtype)
  tokens = sds((1, job["T"]), jnp.int32)
  return step, [jax.tree.map(to_sds, params), jax.tree.map(to_sds, opt_state), tokens, tokens]


def rest_model(records, attentions=ATTENTIONS):
  """{attention: (a, b, c, d)} of rest(L, T) = a + b L + c T + d L T (cycles)."""
  out = {}
  for att in attentions:
    pts = {}
    for rec in records:
      j = rec["job"]
      if j["attention"] != att:
        continue
      if "error" in rec:
        raise RuntimeError(f"{att} L={j['layers']} T={j['T']}: {rec['error'][:300]}")
      prog = tpu_schedule.summarise_program([rec], [j["T"]])
      pts[(j["layers"], j["T"])] = prog["compiled"][j["T"]]
    (l0, l1), (t0, t1) = COMPILE_LAYERS, COMPILE_SEQS
    # bilinear through the four corners
    d = ((pts[(l1, t1)] - pts[(l0, t1)]) - (pts[(l1, t0)] - pts[(l0, t0)])) / ((l1 - l0) * (t1 - t0))
    b = (pts[(l1, t0)] - pts[(l0, t0)]) / (l1 - l0) - d * t0
    c = (pts[(l0, t1)] - pts[(l0, t0)]) / (t1 - t0) - d * l0
    a = pts[(l0, t0)] - b * l0 - c * t0 - d * l0 * t0
    out[att] = dict(coef=(a, b, c, d), compiled={f"{l}|{t}": v for (l, t), v in pts.items()})
  return out


def rest_cycles(model, att, layers, T):
  a, b, c, d = model[att]["coef"]
  return a + b * layers + c * T + d * layers * T


def attention_cycles(schedule_rows, gen, T):
  """(ours, anchor, anchor name) of the H=64 VJP at T from tpu_schedule rows."""
  keys = ("ours_cycles", "ours_cycles_conservative", "anchor_cycles", "anchor")
  for r in schedule_rows:
    if (r["gen"], r["H"], r["mode"], r["T"]) == (gen, 64, "vjp", T) and all(k in r for k in keys):
      return tuple(r[k] for k in keys)
  return None


def report(gen, model, schedule_rows, clock_hz):
  rows = []
  for T in REPORT_SEQS:
    att = attention_cycles(schedule_rows, gen, T)
    if att is None:
      continue
    ours, ours_cons, anchor, anchor_name = att
    rest_ps = rest_cycles(model, "polysketch", LAYERS, T)
    rest_sm = rest_cycles(model, "softmax", LAYERS, T)
    step_ps = rest_ps + LAYERS * ours
    step_ps_cons = rest_ps + LAYERS * ours_cons
    step_sm = rest_sm + LAYERS * anchor
    rows.append(dict(gen=gen, T=T, rest_polysketch=rest_ps, rest_softmax=rest_sm,
                     attention_polysketch=LAYERS * ours,
                     attention_polysketch_conservative=LAYERS * ours_cons,
                     attention_anchor=LAYERS * anchor, anchor=anchor_name,
                     step_polysketch=step_ps, step_polysketch_conservative=step_ps_cons,
                     step_softmax=step_sm, speedup=step_sm / step_ps,
                     speedup_conservative=step_sm / step_ps_cons,
                     step_polysketch_ms=step_ps / clock_hz * 1e3,
                     step_softmax_ms=step_sm / clock_hz * 1e3))
  return rows


def break_even(rows):
  """The T at which the modelled steps cost the same (cons.), between the
  crossover and the reported T below it; None without a crossover inside the
  rows. Between those two T, the rest of either step and the PolySketch
  attention are linear in T (per token, per block) and the anchor's causal
  kernels alpha T + beta T^2 (blocks on or below the diagonal), each fitted
  through its two points; solved by bisection."""
  by_T = {r["T"]: r for r in rows}
  t1 = tpu_schedule.crossover(rows)
  below = [T for T in by_T if t1 is not None and T < t1]
  if not below:
    return None
  t0 = max(below)
  r0, r1 = by_T[t0], by_T[t1]
  lin = lambda key, T: r0[key] + (r1[key] - r0[key]) * (T - t0) / (t1 - t0)
  # anchor(T) = a T + b T^2 through (t0, A0), (t1, A1)
  a0, a1 = r0["attention_anchor"], r1["attention_anchor"]
  b = (a1 / t1 - a0 / t0) / (t1 - t0)
  a = a0 / t0 - b * t0
  gap = lambda T: (lin("rest_softmax", T) + a * T + b * T * T
                   - lin("step_polysketch_conservative", T))
  lo, hi = float(t0), float(t1)
  if gap(lo) > 0 or gap(hi) <= 0:
    return None
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if gap(mid) > 0 else (mid, hi)
  return hi


def markdown(doc) -> str:
  out = []
  hidden = (doc.get("config") or {}).get("sketch_hidden_dim")
  sketch = "learned sketch" + (f" of hidden width {hidden}" if hidden else "")
  for gen, res in doc["generations"].items():
    out.append(f"\n#### {gen}: GPT-2 small training step (12 layers, width 768, 12 heads, "
               f"H=64, r=32, b=256, {sketch} + exact local blocks, bf16), batch 1\n")
    out.append("| T | rest, PolySketch model Mcyc | rest, softmax model Mcyc | "
               "12 x PolySketch attention VJP | 12 x anchor VJP (kernel) | "
               "step PolySketch Mcyc (ms) | step softmax Mcyc (ms) | speed-up | speed-up (cons.) |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
      out.append(
          f"| {r['T']} | {r['rest_polysketch'] / 1e6:.2f} | {r['rest_softmax'] / 1e6:.2f} | "
          f"{r['attention_polysketch'] / 1e6:.2f} | {r['attention_anchor'] / 1e6:.2f} "
          f"({r['anchor']}) | {r['step_polysketch'] / 1e6:.2f} ({r['step_polysketch_ms']:.1f}) | "
          f"{r['step_softmax'] / 1e6:.2f} ({r['step_softmax_ms']:.1f}) | {r['speedup']:.2f} | "
          f"{r['speedup_conservative']:.2f} |")
    out.append(f"\nCrossover (cons.): the PolySketch step is faster from T = "
               f"{res['crossover']} on (of the T reported)"
               + (f"; the two steps cost the same at T = {res['break_even']:,.0f} (interpolated "
                  f"between the T reported: rest and PolySketch linear in T, the anchor "
                  f"a T + b T^2).\n" if res.get("break_even") else ".\n"))
  out.append(f"\n{PAPER}.\n")
  return "\n".join(out)


def _write(doc, args, sched, generations) -> str:
  """Rows against the schedule table; <tag>.json and <tag>.md. Returns the markdown."""
  doc["schedule"] = os.path.basename(args.schedule)
  for gen, res in doc["generations"].items():
    res["rows"] = report(gen, res["rest"], sched["rows"], generations[gen].clock_hz)
    res["crossover"] = tpu_schedule.crossover(res["rows"])
    res["break_even"] = break_even(res["rows"])
  path = os.path.join(tpu_schedule.RESULTS, args.tag)
  json.dump(doc, open(path + ".json", "w"), indent=1)
  md = markdown(doc)
  open(path + ".md", "w").write(md)
  return md


def _compiled_with(sketch_hidden=None):
  """The model and compile grid a gpt_step JSON's rest models hold for (beside
  libtpu); sketch_hidden: the learned sketch's hidden width where not the
  default 8r (a key of the config only then, so older JSONs stay comparable)."""
  config = GPT2_SMALL if sketch_hidden is None else {**GPT2_SMALL, "sketch_hidden_dim": sketch_hidden}
  return dict(config=config, layers=LAYERS, compile_layers=list(COMPILE_LAYERS),
              compile_seqs=list(COMPILE_SEQS))


# config keys that change only the PolySketch model's rest
SKETCH_ONLY = ("sketch_hidden_dim",)


def _kept_rest(args, ver):
  """The existing JSON (--rest-from, default <tag>.json), for compiling only some
  attentions' rest into it. With --attentions polysketch the sketch's width may
  differ from that file's: the softmax rest does not depend on it, and the
  result then holds only the generations compiled now, with the new config."""
  path = args.rest_from or os.path.join(tpu_schedule.RESULTS, args.tag + ".json")
  if not os.path.exists(path):
    raise SystemExit(f"--attentions {' '.join(args.attentions)} updates {path}, which is missing")
  doc = json.load(open(path))
  if doc.get("libtpu") != ver:
    raise SystemExit(f"{path} was compiled with libtpu {doc.get('libtpu')}, this is {ver}: "
                     f"compile every attention")
  want = _compiled_with(args.sketch_hidden)
  ignored = SKETCH_ONLY if "polysketch" in args.attentions else ()
  strip = lambda c: {k: v for k, v in (c or {}).items() if k not in ignored}
  changed = [k for k, v in want.items()
             if (strip(doc.get(k)) != strip(v) if k == "config" else doc.get(k) != v)]
  if changed:
    raise SystemExit(f"{path} was compiled with other {', '.join(changed)}: compile every attention")
  for gen in args.gens:
    kept = doc["generations"].get(gen, {}).get("rest", {})
    missing = [a for a in ATTENTIONS if a not in args.attentions and a not in kept]
    if missing:
      raise SystemExit(f"{path} has no {gen} rest for {missing}: compile them too")
  if doc.get("config") != want["config"]:
    doc = dict(doc, **want, generations={
        gen: dict(rest={a: m for a, m in doc["generations"][gen]["rest"].items()
                        if a not in args.attentions}) for gen in args.gens})
  return doc


def _merged(paths):
  """One doc of several gpt_step JSONs: their generations' rest models, later
  files winning; refuses files of another libtpu or model. A path may name
  the generations to take from it, `FILE:v5e,v6e` (a run with `--rest-from`
  holds the generations it copied too); without, all of the file's."""
  def load(spec):
    path, _, gens = spec.partition(":")
    doc = json.load(open(path))
    if gens:
      wanted = gens.split(",")
      missing = [g for g in wanted if g not in doc["generations"]]
      if missing:
        raise SystemExit(f"{path} holds no generation {', '.join(missing)} "
                         f"(it holds {', '.join(doc['generations'])})")
      doc["generations"] = {g: doc["generations"][g] for g in wanted}
    return path, doc

  first, doc = load(paths[0])
  for spec in paths[1:]:
    path, other = load(spec)
    for key in ("libtpu", *_compiled_with()):
      if other.get(key) != doc.get(key):
        raise SystemExit(f"{path} has another {key} than {first}: "
                         f"{other.get(key)!r} against {doc.get(key)!r}")
    for gen, res in other["generations"].items():
      doc["generations"][gen] = dict(rest=res["rest"])
  return doc


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gens", nargs="+", default=["v5e", "v6e"])
  p.add_argument("--schedule", default=os.path.join(tpu_schedule.RESULTS, "tpu_schedule.json"),
                 help="tpu_schedule JSON with the H=64 attention rows")
  p.add_argument("--tag", default="gpt_step")
  p.add_argument("--from-json", nargs="+",
                 help="re-report gpt_step JSONs against --schedule, their generations merged "
                      "(later files win; same libtpu and model); FILE:v5e,v6e takes only "
                      "those generations from FILE")
  p.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS),
                 help="compile only these models' rest; the others' come from the existing "
                      "<tag>.json or --rest-from (same libtpu), e.g. after a change to the "
                      "sketch features")
  p.add_argument("--rest-from", default=None, metavar="JSON",
                 help="with --attentions: the gpt_step JSON the other models' rest comes from")
  p.add_argument("--sketch-hidden", type=int, default=None,
                 help="the learned sketch's hidden width (default 8r = 256, the paper's)")
  args = p.parse_args(argv)
  if args.from_json and (args.sketch_hidden is not None or args.rest_from):
    p.error("--from-json re-reports the JSONs' own models: --sketch-hidden and --rest-from "
            "apply to compiles")
  if args.rest_from and set(args.attentions) == set(ATTENTIONS):
    p.error("--rest-from needs --attentions with a subset of the models")
  ver = tpu_schedule.libtpu_version()
  sched = json.load(open(args.schedule))
  from pallas_polysketch.tpu_config import GENERATIONS
  for gen in ([] if args.from_json else args.gens):    # before an hour of compiles
    if attention_cycles(sched["rows"], gen, 32768) is None:
      raise SystemExit(f"{args.schedule} has no H=64 vjp row for {gen} at T=32768 with "
                       f"ours_cycles, ours_cycles_conservative, anchor_cycles and anchor: "
                       f"regenerate it with bench/tpu_schedule.py")
  if args.from_json:
    doc = _merged(args.from_json)
    print(_write(doc, args, sched, GENERATIONS))
  else:
    if ver is None:
      print("libtpu is not installed: nothing to compile; skipping.")
      return 1
    doc = dict(libtpu=ver, **_compiled_with(args.sketch_hidden), generations={})
    if set(args.attentions) != set(ATTENTIONS):
      doc = _kept_rest(args, ver)
    overrides = ({} if args.sketch_hidden is None
                 else dict(config=dict(sketch_hidden_dim=args.sketch_hidden)))
    for gen in args.gens:
      jobs = [dict(op="gpt", attention=a, layers=l, T=t, B=1, N=12, H=64, r=32, block="gpt",
                   **overrides)
              for a in args.attentions for l in COMPILE_LAYERS for t in COMPILE_SEQS]
      recs = tpu_schedule.run_jobs(gen, jobs)
      rest = doc["generations"].setdefault(gen, dict(rest={}))["rest"]
      rest.update(rest_model(recs, args.attentions))
      _write(doc, args, sched, GENERATIONS)     # after each generation: compiles are slow
    print(_write(doc, args, sched, GENERATIONS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
