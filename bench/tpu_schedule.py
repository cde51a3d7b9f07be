"""TPU speed without a TPU: cycle counts from the TPU compiler's static schedule.

For each TPU generation this compiles (on the CPU host, for a
`get_topology_desc` device) the PolySketch forward and its VJP (forward +
both backward kernels) and the two softmax anchors, jax's Pallas flash
attention (causal, [B, N, T, H], BlockSizes 128...1024 searched) and splash
attention (`make_splash_mha` with a causal mask, block_q / block_kv /
block_kv_compute in {512, 1024, 2048} searched), forward and backward, with
`LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR`, and parses the `*-final_bundles.txt`
schedules (see `bundles.py`). Static cycles are a lower bound on time: DMA
waits and stalls are not in the schedule.

How counts are extended over T: a Pallas kernel's loop body does not depend on
the grid size, so one compile gives its cycles at any T (grid steps x body,
minus the skipped `pl.when` regions, plus the pipeline stages); this is checked
against direct compiles at other T (`scaling_check` in the JSON). XLA fusions
(our layout transposes, flash's small XLA ops) are compiled at several T and
interpolated linearly in T (extrapolated beyond the largest compiled T).

Megacore (v4, v5p): the count is per TensorCore. Each worker compiles for one
device of the topology; if the compiler split a "parallel" grid axis over the
two TensorCores, the grid loop's trip count is half the grid, and the cycles
(and time) are those of one core, both cores running at once. The JSON records
`grid_steps_per_core` as found.

The anchor of each pass is the faster of flash and splash, each at its
fastest block sizes per kernel. The physical limit is causal softmax
attention's model flops (forward: QK^T and PV over half the pairs; backward:
twice that) at 100% of the MXU peak: no softmax kernel can be faster.

  python bench/tpu_schedule.py            # all generations, both head shapes
  python bench/tpu_schedule.py --gens v5e --shapes 64
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bundles  # noqa: E402
from pallas_polysketch.tpu_config import GENERATIONS  # noqa: E402

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
SEQS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
SHAPES = {64: dict(B=1, N=12, H=64, r=32), 128: dict(B=1, N=12, H=128, r=64)}
BLOCK = 256
TILE = None   # TileConfig overrides used (None: the generation's defaults)
OUR_COMPILE_SEQS = (2048, 16384)   # direct compiles (fusion interpolation, scaling check)
FLASH_COMPILE_SEQS = (8192,)       # flash kernels are structural; its XLA ops scale as T
FLASH_BLOCKS = (128, 256, 512, 1024)
SPLASH_SIZES = (512, 1024, 2048)
# (block_q, block_kv, block_kv_compute): compute divides block_kv. The same
# sizes are used for the dq and dkv kernels (BlockSizes' *_dq / *_dkv fields).
SPLASH_BLOCKS = tuple((q, kv, c) for q in SPLASH_SIZES for kv in SPLASH_SIZES
                      for c in SPLASH_SIZES if c <= kv and kv % c == 0)
SPLASH_COMPILE_SEQS = (4096,)   # kernels are structural; 2 blocks of the largest size
FEATURE_SKETCHES = ("learned", "random")   # the layer's sketch features, compiled alone
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROGRAM_FILES = ("TLP", "<late-finalization>", "<late-initialization>")


# ----------------------------------------------------------------------------
# Worker: compiles in a fresh process with the dump flag set before libtpu starts.

def _worker(spec_path: str, out_path: str) -> None:
  spec = json.load(open(spec_path))
  dump = spec["dump_dir"]
  os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "")
                                    + f" --xla_jf_dump_to={dump}").strip()
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  from pallas_polysketch import polysketch_attention
  from pallas_polysketch import tpu_config
  from pallas_polysketch.tpu_config import TileConfig, resolve_tiles

  # What the package defaults to on the target generation (e.g. the feature
  # kernels' tiling, which takes no TileConfig inside a model): no TPU is
  # attached to detect it from.
  tpu_config.DEFAULT_GENERATION = spec["gen"]
  topo = topologies.get_topology_desc(TOPOLOGIES[spec["gen"]], "tpu")
  sharding = jax.sharding.make_single_device_sharding(topo.devices[0])
  arr = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)
  results = []
  for job in spec["jobs"]:
    B, N, H, r, T = (job[k] for k in ("B", "N", "H", "r", "T"))
    if job["op"] == "tiny":
      fn, args = _tiny_kernel(arr, B, N, T, H)
    elif job["op"] == "polysketch":
      tc = TileConfig(generation=spec["gen"], **job.get("tile", {}))
      # The causal kernels' grid steps walk several blocks (`kernel_model`).
      resolved = resolve_tiles(tc, block_size=job["block"], head_dim=H, sketch_dim=r,
                               dtype=jnp.bfloat16, feature_dtype=jnp.bfloat16)
      for kernel in ("", "dq_", "dkv_"):
        job[(kernel or "fwd_") + "blocks_per_step"] = getattr(resolved, kernel + "blocks_per_step")
      fwd = lambda q, k, v, fq, fk: polysketch_attention(
          q, k, v, fq, fk, block_size=job["block"], implementation="pallas", tile_config=tc)
      args = [arr(B, T, N, H)] * 3 + [arr(B, T, N, r)] * 2
    elif job["op"] == "features":
      fn, args = _features_fn(
          lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding), job)
    elif job["op"] == "gpt":
      import gpt_step
      fn, args = gpt_step.step_fn(
          lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding), job)
    elif job["op"] == "splash":
      bq, bkv, bc = job["splash_blocks"]
      bs = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bc,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bc,
                         block_q_dq=bq, block_kv_dq=bkv)
      mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(N)])
      kernel = sk.make_splash_mha(mask, block_sizes=bs, head_shards=1, q_seq_shards=1)
      # The kernel takes one example [N, T, H]; B = 1 in every job.
      fwd = (lambda kern: lambda q, k, v: kern(q[0], k[0], v[0])[None])(kernel)
      args = [arr(B, N, T, H)] * 3
    else:
      s = job["block"]
      bs = fa.BlockSizes(block_q=s, block_k_major=s, block_k=s, block_b=1,
                         block_q_major_dkv=s, block_k_major_dkv=s, block_k_dkv=s,
                         block_q_dkv=s, block_k_major_dq=s, block_k_dq=s, block_q_dq=s)
      fwd = lambda q, k, v: fa.flash_attention(q, k, v, causal=True, block_sizes=bs)
      args = [arr(B, N, T, H)] * 3
    if job["op"] in ("tiny", "features", "gpt"):
      pass
    elif job["mode"] == "fwd":
      fn = fwd
    else:
      def fn(*a, do):
        o, vjp = jax.vjp(fwd, *a)
        return vjp(do)
      out_shape = (B, T, N, H) if job["op"] == "polysketch" else (B, N, T, H)
      fn = (lambda f: lambda *a: f(*a[:-1], do=a[-1]))(fn)
      args = args + [arr(*out_shape)]
    before = set(os.listdir(dump))
    rec = dict(job=job)
    try:
      t0 = time.time()
      compiled = jax.jit(fn).lower(*args).compile()
      rec["compile_s"] = round(time.time() - t0, 1)
      copies = bundles.layout_copies(compiled.as_text())
      rec["layout_copies"] = [c["name"] for c in copies]
      rec["layout_copy_bytes"] = sum(c["bytes"] for c in copies)
    except Exception as e:  # noqa: BLE001 - recorded, the driver skips it
      rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    new = sorted(set(os.listdir(dump)) - before)
    files = [f for f in new if f.endswith("-final_bundles.txt")
             and "schedule-analysis" not in f]
    rec["schedules"] = []
    tlp = [f for f in new if f.endswith("-final_bundles.txt") and bundles.kernel_name(f) == "TLP"]
    dedup = [f for f in new if f.endswith("-TLP-00-deduplication-map.txt")]
    if len(tlp) == 1:
      try:
        rec["calls"] = bundles.program_calls(
            open(os.path.join(dump, tlp[0])).read(),
            open(os.path.join(dump, dedup[0])).read() if len(dedup) == 1 else None)
      except bundles.ScheduleFormatError as e:
        rec["calls_error"] = str(e)
    for f in files:
      name = bundles.kernel_name(f)
      try:
        text = open(os.path.join(dump, f)).read()
        sched = bundles.parse(text, name)
        rec["schedules"].append(sched.to_json())
        if job.get("slot_counts"):
          rec.setdefault("slots", {})[name] = bundles.slot_counts(text, sched)
        if job.get("slots_per_bundle") and sched.loops:
          rec.setdefault("slots_per_bundle", {})[name] = bundles.slots_per_bundle(text, sched)
      except bundles.ScheduleFormatError as e:
        rec["schedules"].append({"name": name, "format_error": str(e)})
      if job.get("keep_excerpt_of") == name:
        rec["excerpt_file"] = os.path.join(dump, f)
    if "error" not in rec and not files:
      rec["error"] = "no *-final_bundles.txt dump appeared"
    for f in new:
      if rec.get("excerpt_file", "").endswith(f):
        continue
      try:
        os.remove(os.path.join(dump, f))
      except OSError:
        pass
    results.append(rec)
    print(json.dumps({k: rec.get(k) for k in ("job", "compile_s", "error")}), flush=True)
  json.dump(results, open(out_path, "w"))


def _features_fn(sds, job):
  """The sketch features of q [B, T, N, H] and k as the Flax layer computes them
  (one sketch per layer; learned: float32 params, bf16 activations), forward
  or forward + VJP (into q, k and the learned params; the features are returned
  too, as a model consumes them). job["implementation"]: the learned sketch's
  (None: the Pallas kernels on TPU; "xla": XLA's fusions); job["features_tile"],
  job["bf16_gelu"]: their `TileConfig` fields (None: the generation's)."""
  import jax
  import jax.numpy as jnp
  from pallas_polysketch import sketches
  from pallas_polysketch.tpu_config import TileConfig
  B, N, H, r, T = (job[k] for k in ("B", "N", "H", "r", "T"))
  key = jax.random.key(0)
  if job["sketch"] == "learned":
    params = sketches.learned_sketch_init(key, H, r, hidden_dim=job.get("hidden"))
    tile = {k: job[k] for k in ("features_tile", "bf16_gelu") if job.get(k) is not None}
    feats = functools.partial(sketches.learned_sketch_features,
                              implementation=job.get("implementation"),
                              tile_config=TileConfig(**tile) if tile else None)
  else:
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                          sketches.random_sketch_init(key, H, r, degree=4))
    feats = lambda p, x: sketches.random_sketch_features(p, x).astype(x.dtype)
  arr = lambda *shape: sds(shape, jnp.bfloat16)
  p_args = jax.tree.map(lambda a: sds(a.shape, a.dtype), params)
  both = lambda p, q, k: (feats(p, q), feats(p, k))
  args = [p_args, arr(B, T, N, H), arr(B, T, N, H)]
  if job["mode"] == "fwd":
    return both, args
  learned = job["sketch"] == "learned"

  def fn(p, q, k, dfq, dfk):
    features, vjp = jax.vjp(both, p, q, k)
    dp, dq, dk = vjp((dfq, dfk))
    return features, (dp if learned else None), dq, dk
  return fn, args + [arr(B, T, N, r), arr(B, T, N, r)]


def _tiny_kernel(arr, B, N, T, H):
  """A small grid kernel with a pl.when region: the parser's committed test data."""
  import jax.numpy as jnp
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu

  def kernel(x_ref, o_ref, acc_ref):
    @pl.when(pl.program_id(1) == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)
    acc_ref[...] += x_ref[...].astype(jnp.float32) * 2.0
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  def fn(x):
    return pl.pallas_call(
        kernel, grid=(N, T // 128),
        in_specs=[pl.BlockSpec((None, 128, H), lambda n, t: (n, t, 0))],
        out_specs=pl.BlockSpec((None, 128, H), lambda n, t: (n, t, 0)),
        out_shape=jax.ShapeDtypeStruct((N, T, H), jnp.bfloat16),
        scratch_shapes=[pltpu.VMEM((128, H), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        name="tiny_accumulate")(x)
  import jax
  return fn, [arr(N, T, H)]


def write_test_data(path: str, gen: str = "v5e") -> dict:
  """Compiles the tiny kernel and saves its final bundles to `path`."""
  import shutil
  job = dict(op="tiny", mode="fwd", T=512, block=128, B=1, N=2, H=128, r=0,
             keep_excerpt_of="tiny_accumulate.1")
  with tempfile.TemporaryDirectory() as tmp:
    recs = run_jobs(gen, [job], dump_dir=tmp)
    rec = recs[0]
    if "excerpt_file" not in rec:
      raise RuntimeError(f"no schedule for the tiny kernel: {rec.get('error')}, "
                         f"{[s.get('name') for s in rec['schedules']]}")
    shutil.copy(rec["excerpt_file"], path)
  return rec


def run_jobs(gen: str, jobs: list[dict], dump_dir: str | None = None) -> list[dict]:
  """Runs `jobs` for `gen` in one fresh subprocess (sequential compiles)."""
  with tempfile.TemporaryDirectory() as tmp:
    dump = dump_dir or os.path.join(tmp, "dump")
    os.makedirs(dump, exist_ok=True)
    spec = os.path.join(tmp, "spec.json")
    out = os.path.join(tmp, "out.json")
    json.dump({"gen": gen, "jobs": jobs, "dump_dir": dump}, open(spec, "w"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    cmd = ["nice", "-n", "5", sys.executable, os.path.abspath(__file__),
           "--worker", spec, out]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0 or not os.path.exists(out):
      tail = proc.stderr[-2000:]
      return [dict(job=j, error=f"worker failed (rc {proc.returncode}): {tail}",
                   schedules=[]) for j in jobs]
    return json.load(open(out))


# ----------------------------------------------------------------------------
# Semantics of the kernels' grids and pl.when regions.

def _causal_fraction(nq, bq, nk, bk):
  """Fraction of (q block, kv block) steps flash attention runs (below_or_on_diag)."""
  run = sum(1 for i in range(nq) for j in range(nk) if (i + 1) * bq - 1 > j * bk)
  return run / (nq * nk)


def kernel_model(name: str, job: dict, T: int):
  """(grid steps, when_fractions) of a Pallas kernel of `job` at length T, or None."""
  B, N = job["B"], job["N"]
  if name.startswith("polysketch_"):
    nb = T // job["block"]
    # The causal kernels' grid steps walk several blocks; records from before
    # the forward (the backward) did lack fwd_ (dq_, dkv_) blocks_per_step.
    from pallas_polysketch._pallas_forward import blocks_per_step
    if name.startswith("polysketch_causal_forward"):
      nb //= blocks_per_step(nb, job.get("fwd_blocks_per_step", 1))
    elif name.startswith(("polysketch_bwd_dq", "polysketch_bwd_dkv")):
      kernel = name.split("_")[2].split(".")[0]           # dq | dkv
      nb //= blocks_per_step(nb, job.get(kernel + "_blocks_per_step", 1))
    # Every pl.when in our kernels runs at one grid index (first or last).
    return B * N * nb, lambda spans: [1.0 / nb] * len(spans)
  if name.startswith("splash_"):
    bq, bkv, _ = job["splash_blocks"]
    nq, nk = T // bq, T // bkv
    if not nq or not nk:
      return None           # a block longer than the sequence
    frac = _causal_fraction(nq, bq, nk, bkv)
    inner = nq if "_dkv" in name else nk   # dkv walks q blocks innermost
    # A causal mask does not shrink splash's grid (every kv column has a
    # non-empty first q block). Regions: `should_run` (the largest, causal), and
    # the init / write-out at one inner index.
    return B * N * nq * nk, _causal_regions(frac, inner)
  if "flash" in name:
    s = job["block"]
    n = T // s
    if not n:
      return None
    frac = _causal_fraction(n, s, n, s)
    # The largest region is `should_run` (causal); the others run at one block
    # index (init / finalize), or are tiny (dq's should_not_run: empty here).
    return B * N * n * n, _causal_regions(frac, n)
  return None


def _causal_regions(frac, inner):
  """when_fractions of a causal softmax kernel: the largest region (`should_run`)
  at the causal fraction `frac`, the others once per `inner` steps."""
  def fractions(spans):
    if not spans:
      return []
    big = max(range(len(spans)), key=lambda i: spans[i].skipped)
    return [frac if i == big else 1.0 / inner for i in range(len(spans))]
  return fractions


def _is_program(name):
  return name in PROGRAM_FILES


def runs(rec, name):
  """How many times the program runs the dumped schedule `name`: identical
  kernels are dumped once (`bundles.program_calls`). 1 for the TLP, for
  records written before call counts were kept, and for a schedule the TLP
  does not call directly."""
  calls = rec.get("calls")
  if not calls or name == "TLP":
    return 1
  return calls.get(name) or 1


def summarise(records: list[dict], T_targets, op: str) -> dict:
  """Cycles per kernel (structural, any T) and fusions (interpolated) for one config."""
  ok = [r for r in records if "error" not in r]
  if not ok:
    return {"error": "; ".join(r.get("error", "") for r in records)[:600]}
  out = {"kernels": {}, "compiled": {}, "scaling_check": [], "bases": {}}
  # Kernel structure per compiled T; stages from each trip count.
  for rec in ok:
    kern = {}
    for s in rec["schedules"]:
      if "format_error" in s:
        if s["name"] and (s["name"].startswith(("polysketch", "splash")) or "flash" in s["name"]):
          return {"error": f"format not recognised: {s['format_error']}"}
        continue
      sched = bundles.Schedule.from_json(s)
      model = kernel_model(sched.name, rec["job"], rec["job"]["T"])
      if model is None:
        continue
      steps, frac = model
      trips = sched.loops[0].trips if sched.loops else 0
      if 0 <= trips - steps <= 4:
        per_core, split = steps, False
      elif 0 <= trips - steps // 2 <= 4:
        per_core, split = steps // 2, True
      else:
        return {"error": f"{sched.name}: trip count {trips} does not match grid {steps}"}
      kern[sched.name] = dict(schedule=s, stages=trips - per_core, megacore_split=split,
                              grid_steps_per_core=per_core, runs=runs(rec, sched.name))
    out["bases"][rec["job"]["T"]] = kern
  base_Ts = sorted(out["bases"])
  out["kernels"] = out["bases"][base_Ts[-1]]
  if not out["kernels"]:
    return {"error": "no Pallas kernel schedule found in the dump"}
  job0 = ok[0]["job"]

  def kernel_cycles(name, T, base_T=None):
    """From the compile at base_T, default: the largest compiled T <= T (else the smallest)."""
    if base_T is None:
      below = [t for t in base_Ts if t <= T]
      base_T = below[-1] if below else base_Ts[0]
    k = out["bases"][base_T][name]
    steps, frac = kernel_model(name, job0, T)
    if k["megacore_split"]:
      steps //= 2
    return k.get("runs", 1) * bundles.grid_kernel_cycles(
        bundles.Schedule.from_json(k["schedule"]), steps=steps, when_fractions=frac,
        stages=k["stages"])["cycles"]

  # Fusions and program overhead per compiled T.
  fus = {}
  for r in ok:
    T = r["job"]["T"]
    total = 0
    kern_direct = {}
    for s in r["schedules"]:
      if "format_error" in s:
        out.setdefault("unparsed", [])
        if s["name"] not in out["unparsed"]:
          out["unparsed"].append(s["name"])
        continue
      sched = bundles.Schedule.from_json(s)
      if sched.name in out["kernels"]:
        k = out["kernels"][sched.name]
        steps, frac = kernel_model(sched.name, r["job"], T)
        if k["megacore_split"]:
          steps //= 2
        stages = sched.loops[0].trips - steps
        kern_direct[sched.name] = runs(r, sched.name) * bundles.grid_kernel_cycles(
            sched, steps=steps, when_fractions=frac, stages=stages)["cycles"]
      else:
        total += sched.static_cycles() * runs(r, sched.name)
    fus[T] = total
    for name, direct in kern_direct.items():
      for bT in base_Ts:
        if bT != T and name in out["bases"][bT]:
          pred = kernel_cycles(name, T, base_T=bT)
          out["scaling_check"].append(dict(kernel=name, T=T, direct=direct, from_T=bT,
                                           predicted=pred, rel_err=(pred - direct) / direct))
    out["compiled"][T] = dict(kernels=kern_direct, other=total)
    if "layout_copy_bytes" in r:
      out["compiled"][T]["layout_copy_bytes"] = r["layout_copy_bytes"]
  Ts = sorted(fus)

  def other_cycles(T):
    if len(Ts) == 1:
      return fus[Ts[0]] * T / Ts[0]
    for a, b in zip(Ts, Ts[1:]):
      if T <= b or b == Ts[-1]:
        lo, hi = (a, b)
        if T <= b:
          break
    return fus[lo] + (fus[hi] - fus[lo]) * (T - lo) / (hi - lo)

  measured = [t for t in Ts if "layout_copy_bytes" in out["compiled"][t]]
  tc = measured[-1] if measured else None
  out["per_T"] = {}
  for T in T_targets:
    if any(kernel_model(n, job0, T) is None for n in out["kernels"]):
      continue              # the configuration does not fit T
    ks = {n: kernel_cycles(n, T) for n in out["kernels"]}
    o = max(0.0, other_cycles(T))
    out["per_T"][T] = dict(kernels=ks, other=o, total=sum(ks.values()) + o)
    if measured:             # every copied array is [B, T, N, D]: bytes scale as T
      out["per_T"][T]["layout_copy_bytes"] = out["compiled"][tc]["layout_copy_bytes"] * T / tc
  return out


# ----------------------------------------------------------------------------

def softmax_model_flops(mode, B, N, T, H):
  """Causal softmax attention's model flops: QK^T and PV over half the pairs;
  the backward (dV, dP, dQ, dK) twice that, no recomputation counted."""
  f = 2 * 2 * B * N * T * T * H / 2
  return f if mode == "fwd" else 3 * f


def flops(op, mode, B, N, T, H, r, block, tiles=None):
  """Model flops of one pass; `tiles`: our kernels' ResolvedTiles (local tiles)."""
  if op in ("flash", "splash"):
    f = 2 * 2 * B * N * T * T * H / 2           # causal: QK^T and PV, half the pairs
    return f if mode == "fwd" else 3.5 * f      # + dq, dk, dv, recomputed P (2.5x)
  from pallas_polysketch._pallas_forward import forward_flops
  from pallas_polysketch._pallas_backward import backward_flops
  f = forward_flops(B, N, T, H, r, block, causal=True, local_tile=tiles.local_tile)
  if mode == "fwd":
    return f
  dq, dkv = backward_flops(B, N, T, H, r, block, causal=True, local_tile=tiles.dkv_local_tile)
  return f + dq + dkv


def layout_bytes(mode, B, N, T, H, r):
  """HBM bytes of our XLA layout changes [B,T,N,D] <-> [B,N,T,D]/[B,N,D,T] (read + write),
  assumed: the fallback for records from before the worker recorded the
  compiled program's own layout copies (`bundles.layout_copies`).

  Part of these run as DMA copies (copy-start/copy-done), which issue no
  bundles; so they are charged here at HBM bandwidth instead. Forward: q, k,
  v, o (H each) and f_q, f_k (r each), bf16. Backward adds v, dnum (two
  layouts), f_q, f_k (row layout), dq, dk, dv, the f32 df_q, df_k, and the
  reads of dO and O that form dnum.
  """
  fwd = 4 * (4 * H + 2 * r)
  bwd = 4 * (6 * H + 2 * r) + 6 * 2 * r + 2 * 2 * H
  return B * N * T * (fwd if mode == "fwd" else fwd + bwd)


def libtpu_version():
  try:
    from importlib.metadata import version
    return version("libtpu")
  except Exception:  # noqa: BLE001
    return None


def run_generation(gen, shapes, seqs, tile=None, block=BLOCK, flash_blocks=FLASH_BLOCKS,
                   our_seqs=OUR_COMPILE_SEQS, flash_seqs=FLASH_COMPILE_SEQS, modes=("fwd", "vjp"),
                   splash_blocks=SPLASH_BLOCKS, splash_seqs=SPLASH_COMPILE_SEQS, ours=True,
                   features=FEATURE_SKETCHES):
  jobs = []
  for hd in shapes:
    sh = SHAPES[hd]
    for mode in modes:
      for sketch in features:
        for T in OUR_COMPILE_SEQS:
          jobs.append(dict(op="features", mode=mode, T=T, block=sketch, sketch=sketch, **sh))
      for T in our_seqs if ours else ():
        jobs.append(dict(op="polysketch", mode=mode, T=T, block=block, tile=tile or {}, **sh))
      if flash_blocks:
        for s in flash_blocks:
          for T in flash_seqs:
            if s <= T:
              jobs.append(dict(op="flash", mode=mode, T=T, block=s, **sh))
      for sb in splash_blocks:
        for T in splash_seqs:
          if max(sb) <= T:
            jobs.append(dict(op="splash", mode=mode, T=T, block="x".join(map(str, sb)),
                             splash_blocks=list(sb), **sh))
  recs = run_jobs(gen, jobs)
  # The compiles are the expensive part: keep their records if summarising fails.
  saved = os.path.join(tempfile.gettempdir(), f"tpu_schedule_records_{gen}_{os.getpid()}.json")
  with open(saved, "w") as f:
    json.dump(recs, f)
  print(f"{gen}: worker records in {saved}", file=sys.stderr)
  groups = {}
  for r in recs:
    j = r["job"]
    groups.setdefault((j["H"], j["op"], j["mode"], j["block"]), []).append(r)
  out = {}
  for key, rs in groups.items():
    rs.sort(key=lambda r: r["job"]["T"])
    out["|".join(map(str, key))] = (summarise_program(rs, seqs) if key[1] == "features"
                                     else summarise(rs, seqs, key[1]))
  return out


def _interpolate(points: dict, T):
  """Linear in T through the compiled points (extrapolated past the largest;
  through the origin with one point)."""
  Ts = sorted(points)
  if len(Ts) == 1:
    return points[Ts[0]] * T / Ts[0]
  lo, hi = (Ts[0], Ts[1]) if T <= Ts[1] else next(
      ((a, b) for a, b in zip(Ts, Ts[1:]) if T <= b), (Ts[-2], Ts[-1]))
  return points[lo] + (points[hi] - points[lo]) * (T - lo) / (hi - lo)


def summarise_program(records: list[dict], T_targets) -> dict:
  """Static cycles of an XLA-only program (every schedule in its dump), per
  compiled T and interpolated to T_targets."""
  ok = [r for r in records if "error" not in r]
  if not ok:
    return {"error": "; ".join(r.get("error", "") for r in records)[:600]}
  compiled = {}
  for r in ok:
    scheds = [bundles.Schedule.from_json(s) for s in r["schedules"] if "format_error" not in s]
    compiled[r["job"]["T"]] = sum(s.static_cycles() * runs(r, s.name) for s in scheds)
  unparsed = sorted({s["name"] for r in ok for s in r["schedules"] if "format_error" in s})
  return {"compiled": compiled, "unparsed": unparsed,
          "per_T": {T: dict(kernels={}, other=max(0.0, _interpolate(compiled, T)),
                            total=max(0.0, _interpolate(compiled, T))) for T in T_targets}}


def _our_tiles(gen, head_dim):
  """The tiles our kernels were compiled with (the generation's defaults + TILE)."""
  from pallas_polysketch.tpu_config import TileConfig, resolve_tiles
  import jax.numpy as jnp
  sh = SHAPES[head_dim]
  return resolve_tiles(TileConfig(generation=gen, **(TILE or {})), block_size=BLOCK,
                       head_dim=head_dim, sketch_dim=sh["r"], dtype=jnp.bfloat16,
                       feature_dtype=jnp.bfloat16)


def _fastest(cands, T):
  """(cycles, {kernel: blocks}) of one anchor at T: each kernel at its fastest
  block sizes (flash's and splash's BlockSizes set the forward, dq and dkv
  blocks apart), plus the XLA ops of the configuration fastest in total; None
  if no configuration fits T."""
  size = lambda b: max(map(int, str(b).split("x")))
  at_T = {b: v["per_T"][T] for b, v in cands.items() if size(b) <= T and T in v["per_T"]}
  if not at_T:
    return None
  per_kernel = {}
  for b, v in at_T.items():
    for kname, c in v["kernels"].items():
      base = re.sub(r"_block_.*", "", kname.split(".")[0])
      if base not in per_kernel or c < per_kernel[base][0]:
        per_kernel[base] = (c, b)
  best = min(at_T, key=lambda b: at_T[b]["total"])
  total = sum(c for c, _ in per_kernel.values()) + at_T[best]["other"]
  return total, {k: b for k, (c, b) in per_kernel.items()}


def report(all_results, seqs):
  rows = []
  for gen, res in all_results.items():
    g = GENERATIONS[gen]
    for hd in sorted({int(k.split("|")[0]) for k in res}):
      sh = SHAPES[hd]
      for mode in ("fwd", "vjp"):
        ours = res.get(f"{hd}|polysketch|{mode}|{BLOCK}", {})
        flash = {int(k.split("|")[3]): v for k, v in res.items()
                 if k.startswith(f"{hd}|flash|{mode}|") and "per_T" in v}
        splash = {k.split("|")[3]: v for k, v in res.items()
                  if k.startswith(f"{hd}|splash|{mode}|") and "per_T" in v}
        split = any(k.get("megacore_split") for v in res.values()
                    for k in v.get("kernels", {}).values())
        cores = 2 if split else 1
        fpc = cores * g.peak_bf16_flops / g.clock_hz   # flops per cycle of the cores used
        for T in seqs:
          row = dict(gen=gen, H=hd, r=sh["r"], mode=mode, T=T, clock_hz=g.clock_hz,
                     megacore_split=split)
          if "per_T" in ours:
            c = ours["per_T"][T]["total"]
            row.update(ours_cycles=c, ours_ms=c / g.clock_hz * 1e3,
                       ours_transpose_cycles=ours["per_T"][T]["other"],
                       ours_mxu_util=flops("polysketch", mode, sh["B"], sh["N"], T, hd, sh["r"], BLOCK,
                                           tiles=_our_tiles(gen, hd))
                       / (c * fpc))
            copied = ours["per_T"][T].get("layout_copy_bytes")
            if copied is not None:        # the copies in the compiled program, read + write
              lb, source = 2 * copied, "compiled"
            else:                         # records from before copies were recorded
              lb, source = layout_bytes(mode, sh["B"], sh["N"], T, hd, sh["r"]), "formula"
            hbm = lb / g.hbm_bytes_per_s * g.clock_hz
            row["layout_bytes_source"] = source
            kern = sum(ours["per_T"][T]["kernels"].values())
            cons = kern + max(ours["per_T"][T]["other"], hbm)
            row.update(ours_layout_hbm_cycles=hbm, ours_cycles_conservative=cons,
                       ours_ms_conservative=cons / g.clock_hz * 1e3)
          else:
            row["ours_error"] = ours.get("error", "not run")
          limit = softmax_model_flops(mode, sh["B"], sh["N"], T, hd) / fpc
          row["limit_cycles"] = limit
          for op, cands in (("flash", flash), ("splash", splash)):
            best = _fastest(cands, T)
            if best is None:
              continue
            c, blocks = best
            row.update({f"{op}_cycles": c, f"{op}_ms": c / g.clock_hz * 1e3,
                        f"{op}_blocks": blocks,
                        f"{op}_mxu_util": flops(op, mode, sh["B"], sh["N"], T, hd, sh["r"], BLOCK)
                        / (c * fpc)})
          anchors = [op for op in ("flash", "splash") if f"{op}_cycles" in row]
          if anchors:
            op = min(anchors, key=lambda o: row[f"{o}_cycles"])
            row.update(anchor=op, anchor_cycles=row[f"{op}_cycles"],
                       anchor_blocks=row[f"{op}_blocks"])
            if "ours_cycles" in row:
              row["speedup"] = row["anchor_cycles"] / row["ours_cycles"]
              row["speedup_conservative"] = row["anchor_cycles"] / row["ours_cycles_conservative"]
          if "ours_cycles" in row:
            row["speedup_over_limit"] = limit / row["ours_cycles"]
            for sk in FEATURE_SKETCHES:
              fv = res.get(f"{hd}|features|{mode}|{sk}", {})
              if "per_T" not in fv:
                continue
              fc = fv["per_T"][T]["total"]
              row[f"features_{sk}_cycles"] = fc
              if "anchor_cycles" in row:
                row[f"speedup_with_{sk}"] = row["anchor_cycles"] / (row["ours_cycles"] + fc)
                row[f"speedup_with_{sk}_conservative"] = row["anchor_cycles"] / (
                    row["ours_cycles_conservative"] + fc)
          rows.append(row)
  return rows


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, mode in zip(axes, ("fwd", "vjp")):
    for gen, color in zip(TOPOLOGIES, ("C0", "C1", "C2", "C3")):
      for hd, ls, mk in ((64, "-", "o"), (128, "--", "s")):
        sel = [r for r in rows
               if r["gen"] == gen and r["mode"] == mode and r["H"] == hd and "speedup" in r]
        if sel:
          ax.plot([r["T"] for r in sel], [r["speedup"] for r in sel], ls, marker=mk,
                  color=color, label=f"{gen} H={hd}")
          ax.plot([r["T"] for r in sel], [r["speedup_conservative"] for r in sel], ":",
                  color=color, alpha=0.5, lw=1)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_title("forward" if mode == "fwd" else "forward + backward")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("speed-up over the faster of flash / splash (fastest blocks)")
  axes[1].legend(fontsize=7, ncol=2)
  fig.suptitle("PolySketch (r=32/64, b=256) vs flash/splash attention: static TPU schedule, 12 heads, "
               "bf16 (dotted: our layout copies charged at HBM bandwidth)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)



def _write_outputs(doc, rows, ver, tag) -> int:
  """<tag>.json (all rows and raw schedules), <tag>.png, <tag>.md; prints the table."""
  with open(os.path.join(RESULTS, f"{tag}.json"), "w") as f:
    json.dump(doc, f, indent=1, default=str)
  if any("speedup" in r for r in rows):
    plot(rows, os.path.join(RESULTS, f"{tag}.png"))
  print_table(rows, ver)
  with open(os.path.join(RESULTS, f"{tag}.md"), "w") as f:
    f.write(markdown(rows, ver))
  return 0


def main(argv=None):
  global BLOCK, TILE
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  p.add_argument("--gens", nargs="+", default=list(TOPOLOGIES))
  p.add_argument("--shapes", nargs="+", type=int, default=[64, 128])
  p.add_argument("--seqs", nargs="+", type=int, default=SEQS)
  p.add_argument("--tag", default="tpu_schedule")
  p.add_argument("--ops", nargs="+", choices=("polysketch", "flash", "splash", "features"),
                 default=["polysketch", "flash", "splash", "features"],
                 help="what to compile (merge partial runs with --from-json)")
  p.add_argument("--local-tile", type=int, default=None, help="TileConfig.local_tile (all kernels)")
  p.add_argument("--dkv-local-tile", type=int, default=None)
  p.add_argument("--block", type=int, default=BLOCK, help="PolySketch block size b")
  p.add_argument("--from-json", nargs="+", metavar="JSON",
                 help="re-report (and merge) earlier results instead of compiling")
  p.add_argument("--write-test-data", metavar="PATH",
                 help="compile a tiny kernel and save its final bundles to PATH")
  args = p.parse_args(argv)
  if args.worker:
    return _worker(*args.worker)
  if args.write_test_data:
    rec = write_test_data(args.write_test_data)
    print(json.dumps(rec["schedules"], indent=1))
    return 0
  ver = libtpu_version()
  if ver is None:
    print("libtpu is not installed: no TPU schedule can be produced; skipping.")
    return 1
  tile = {k: v for k, v in (("local_tile", args.local_tile),
                            ("dkv_local_tile", args.dkv_local_tile)) if v} or None
  BLOCK, TILE = args.block, tile
  all_results = {}
  os.makedirs(RESULTS, exist_ok=True)
  if args.from_json:
    return _rereport(args)
  for gen in args.gens:
    t0 = time.time()
    all_results[gen] = run_generation(gen, args.shapes, args.seqs, tile=tile, block=BLOCK,
                                      flash_blocks=FLASH_BLOCKS if "flash" in args.ops else (),
                                      splash_blocks=SPLASH_BLOCKS if "splash" in args.ops else (),
                                      ours="polysketch" in args.ops,
                                      features=FEATURE_SKETCHES if "features" in args.ops else ())
    print(f"{gen}: {time.time() - t0:.0f}s", file=sys.stderr)
    rows = report(all_results, args.seqs)  # written after each generation
    doc = dict(libtpu=ver, jax=__import__("jax").__version__, block_size=BLOCK,
               shapes=SHAPES, tile=tile, note="static cycles = lower bound (no DMA "
               "waits/stalls); per TensorCore", rows=rows, raw=all_results)
    status = _write_outputs(doc, rows, ver, args.tag)
  return status


def _rebase(v):
  """Kernel cycles at each T from the nearest compile at or below T.

  Results written before `summarise` chose the nearest base extended every T
  from the smallest compile; rescale by direct / predicted at the nearest
  compiled T (a no-op for results that already use it).
  """
  comp = {int(t): c for t, c in v.get("compiled", {}).items()}
  Ts = sorted(comp)
  if len(Ts) < 2:
    return
  for T, row in v["per_T"].items():
    below = [t for t in Ts if t <= T]
    bT = below[-1] if below else Ts[0]
    if bT not in v["per_T"]:
      continue
    for name in row["kernels"]:
      direct = comp[bT]["kernels"].get(name)
      pred = v["per_T"][bT]["kernels"][name]
      if direct and pred:
        row.setdefault("rescaled", {})[name] = direct / pred
  for row in v["per_T"].values():
    for name, ratio in row.pop("rescaled", {}).items():
      row["kernels"][name] *= ratio
    row["total"] = sum(row["kernels"].values()) + row["other"]


def _rereport(args):
  merged, ver, jaxver = {}, None, None
  for path in args.from_json:
    doc = json.load(open(path))
    ver, jaxver = doc["libtpu"], doc["jax"]
    for gen, res in doc["raw"].items():
      for key, v in res.items():
        if "per_T" in v:
          v["per_T"] = {int(t): x for t, x in v["per_T"].items()}
          _rebase(v)
        old = merged.setdefault(gen, {}).get(key)
        if old is None or "error" in old or "error" not in v:
          merged[gen][key] = v
  rows = report(merged, args.seqs)
  doc = dict(libtpu=ver, jax=jaxver, block_size=BLOCK, shapes=SHAPES, tile=TILE,
             note="static cycles = lower bound (no DMA waits/stalls); per TensorCore",
             merged_from=[os.path.basename(p) for p in args.from_json], rows=rows, raw=merged)
  return _write_outputs(doc, rows, ver, args.tag)


def _blocks(blocks):
  return "/".join(str(v) for v in blocks.values())


def crossover(rows, key="speedup_conservative"):
  """Smallest T from which on `key` > 1 at every larger T of rows; None if not
  at the largest."""
  best = None
  for r in sorted(rows, key=lambda r: -r["T"]):
    if key not in r or r[key] <= 1.0:
      break
    best = r["T"]
  return best


def summary_markdown(rows, T=32768) -> str:
  """One line per generation, head shape and pass at T, and the crossovers."""
  out = [f"\n#### Summary at T = {T} (static / conservative; anchor = the faster of "
         f"flash and splash per kernel)\n",
         "| gen | H, r | pass | ours Mcyc | anchor Mcyc | speed-up | speed-up (cons.) | "
         "with learned features (cons.) | ours MXU util | over the softmax limit | "
         "crossover T (cons.) |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for gen in TOPOLOGIES:
    for hd in sorted({r["H"] for r in rows if r["gen"] == gen}):
      for mode in ("fwd", "vjp"):
        rs = [r for r in rows if (r["gen"], r["H"], r["mode"]) == (gen, hd, mode)]
        at = [r for r in rs if r["T"] == T]
        if not at:
          continue
        r = at[0]
        if "speedup" not in r:
          out.append(f"| {gen} | {hd}, {SHAPES[hd]['r']} | {mode} | skipped: "
                     f"{str(r.get('ours_error', 'no anchor'))[:70]} |" + " |" * 7)
          continue
        learned = (f"{r['speedup_with_learned']:.2f} ({r['speedup_with_learned_conservative']:.2f})"
                   if "speedup_with_learned" in r else "-")
        out.append(
            f"| {gen} | {hd}, {r['r']} | {mode} | {r['ours_cycles'] / 1e6:.3f} | "
            f"{r['anchor_cycles'] / 1e6:.2f} ({r['anchor']}) | {r['speedup']:.2f} | "
            f"{r['speedup_conservative']:.2f} | {learned} | {r['ours_mxu_util']:.2f} | "
            f"{r['speedup_over_limit']:.2f} | {crossover(rs) or '-'} |")
  return "\n".join(out) + "\n"


def markdown(rows, ver) -> str:
  """Per-generation markdown tables (for TPU_SCHEDULE.md)."""
  out = [summary_markdown(rows)]
  mc = lambda r, k: f"{r[k] / 1e6:.2f}" if k in r else "-"
  for gen in TOPOLOGIES:
    rs = [r for r in rows if r["gen"] == gen]
    if not rs:
      continue
    g = GENERATIONS[gen]
    out.append(f"\n#### {gen} ({g.clock_hz / 1e9:.2f} GHz, libtpu {ver})\n")
    out.append("| H, r | pass | T | PolySketch Mcyc (ms) | MXU util | + layout copies at HBM bw, Mcyc | "
               "flash Mcyc | splash Mcyc | anchor (blocks per kernel) | anchor MXU util | "
               "speed-up | speed-up (cons.) | learned / random features Mcyc | "
               "speed-up with learned features (cons.) | with random features (cons.) | "
               "softmax limit Mcyc | speed-up over the limit |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
      if "speedup" not in r:
        out.append(f"| {r['H']}, {r['r']} | {r['mode']} | {r['T']} | skipped: "
                   f"{str(r.get('ours_error', 'no anchor'))[:80]} |" + " |" * 13)
        continue
      a = r["anchor"]
      with_f = lambda sk: (f"{r['speedup_with_' + sk]:.2f} ({r['speedup_with_' + sk + '_conservative']:.2f})"
                           if "speedup_with_" + sk in r else "-")
      out.append(
          f"| {r['H']}, {r['r']} | {r['mode']} | {r['T']} | {r['ours_cycles'] / 1e6:.3f} "
          f"({r['ours_ms']:.3f}) | {r['ours_mxu_util']:.2f} | {r['ours_cycles_conservative'] / 1e6:.3f} | "
          f"{mc(r, 'flash_cycles')} | {mc(r, 'splash_cycles')} | {a} ({_blocks(r['anchor_blocks'])}) | "
          f"{r[a + '_mxu_util']:.2f} | {r['speedup']:.2f} | {r['speedup_conservative']:.2f} | "
          f"{mc(r, 'features_learned_cycles')} / {mc(r, 'features_random_cycles')} | "
          f"{with_f('learned')} | {with_f('random')} | "
          f"{r['limit_cycles'] / 1e6:.2f} | {r['speedup_over_limit']:.2f} |")
  return "\n".join(out) + "\n"


def print_table(rows, ver):
  print(f"libtpu {ver}: static cycles (lower bound), per TensorCore")
  print(f"{'gen':4} {'H':>4} {'mode':4} {'T':>7} {'ours Mcyc':>10} {'util':>5} {'flash':>9} "
        f"{'splash':>9} {'anchor':>6} {'speedup':>8} {'x(cons)':>8} {'x+learn':>8} "
        f"{'limit':>8} {'x limit':>8}")
  for r in rows:
    if "speedup" not in r:
      print(f"{r['gen']:4} {r['H']:>4} {r['mode']:4} {r['T']:>7}  skipped: "
            f"{r.get('ours_error', 'no anchor')}")
      continue
    fm = lambda k: f"{r[k] / 1e6:9.2f}" if k in r else f"{'-':>9}"
    print(f"{r['gen']:4} {r['H']:>4} {r['mode']:4} {r['T']:>7} {r['ours_cycles'] / 1e6:10.3f} "
          f"{r['ours_mxu_util']:5.2f} {fm('flash_cycles')} {fm('splash_cycles')} {r['anchor']:>6} "
          f"{r['speedup']:8.2f} {r['speedup_conservative']:8.2f} "
          f"{r.get('speedup_with_learned', float('nan')):8.2f} {r['limit_cycles'] / 1e6:8.2f} "
          f"{r['speedup_over_limit']:8.2f}")


if __name__ == "__main__":
  sys.exit(main())
