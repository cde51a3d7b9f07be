"""The recall benchmark runs end to end at tiny sizes (no accuracy or timing assertions)."""
import json
import os

import pytest

from helpers import load_bench


def test_recall_benchmark_runs_end_to_end_and_resumes(tmp_path):
  bench = load_bench("recall")
  argv = ["--seqs", "64", "--pairs", "2", "--steps", "3", "--batch-size", "4",
          "--lrs", "1e-3", "3e-3", "--variants", "softmax,local", "--dim", "16", "--layers", "1",
          "--sketch-dim", "4", "--block-size", "16", "--eval-batches", "1",
          "--out-dir", str(tmp_path), "--tag", "tiny"]
  runs = bench.main(argv)
  assert {(r["variant"], r["lr"]) for r in runs} == {
      (v, lr) for v in ("softmax", "local") for lr in (1e-3, 3e-3)}
  for r in runs:
    assert 0.0 <= r["val_acc"] <= 1.0 and r["steps_per_s"] > 0
  report = json.loads((tmp_path / "recall-tiny.json").read_text())
  assert len(report["runs"]) == 4 and "load_before" in report
  md = (tmp_path / "recall-tiny.md").read_text()
  assert "| softmax |" in md and "| local |" in md
  assert (tmp_path / "recall-tiny.png").stat().st_size > 0
  assert bench.main(argv + ["--resume"]) == report["runs"]     # nothing left to run

  # a second process's runs merge into one table
  other = bench.main(argv[:argv.index("--variants")] + [
      "--variants", "polynomial", "--lrs", "1e-3", "--dim", "16", "--layers", "1", "--sketch-dim", "4",
      "--block-size", "16", "--eval-batches", "1", "--out-dir", str(tmp_path), "--tag", "other"])
  merged = bench.main(["--merge", str(tmp_path / "recall-tiny.json"),
                       str(tmp_path / "recall-other.json"), "--out-dir", str(tmp_path),
                       "--tag", "both"])
  assert len(merged) == 5 and other[0] in merged
  md = (tmp_path / "recall-both.md").read_text()
  assert "| polynomial |" in md and "| softmax |" in md and " + " in md


def test_recall_curve_and_distinct_queries_at_short_context(tmp_path, capsys):
  """--eval-every records each run's accuracy curve; with --distinct-queries a
  context that fits pairs + min(queries, pairs) queries runs (it was skipped
  when checked against --queries)."""
  bench = load_bench("recall")
  runs = bench.main(["--seqs", "16", "--pairs", "2", "--distinct-queries", "--queries", "16",
                     "--steps", "3", "--eval-every", "2", "--batch-size", "4",
                     "--variants", "softmax", "--dim", "16", "--layers", "1", "--block-size", "8",
                     "--eval-batches", "1", "--out-dir", str(tmp_path), "--tag", "curve"])
  assert len(runs) == 1
  curve = runs[0]["curve"]
  assert [c["step"] for c in curve] == [2, 3]
  assert curve[-1]["val_acc"] == runs[0]["val_acc"]
  assert "softmax T=16 pairs=2" in capsys.readouterr().out


def test_recall_state_sizes():
  """Softmax's KV cache grows with T; PolySketch keeps r^2 (H + 1) plus one
  block of keys and values; local blocks alone keep just the block."""
  state = load_bench("recall").state_floats
  assert state("softmax", 1024, 32, 16, 64) == 2 * 1024 * 32
  assert state("learned+local", 1024, 32, 16, 64) == state("learned+local", 4096, 32, 16, 64) \
      == 16 ** 2 * 33 + 2 * 64 * 32
  assert state("learned", 1024, 32, 16, 64) == 16 ** 2 * 33
  assert state("local", 1024, 32, 16, 64) == 2 * 64 * 32


def test_merged_runs_of_one_variant_with_other_sketch_dims_or_steps_get_their_own_rows(tmp_path):
  bench = load_bench("recall")
  common = ["--seqs", "16", "--pairs", "2", "--distinct-queries", "--batch-size", "4",
            "--variants", "random+local", "--dim", "16", "--layers", "1", "--block-size", "8",
            "--eval-batches", "1", "--out-dir", str(tmp_path)]
  a = bench.main(common + ["--steps", "2", "--eval-every", "1", "--sketch-dim", "4", "--tag", "a"])
  b = bench.main(common + ["--steps", "3", "--sketch-dim", "8", "--tag", "b"])
  assert (a[0]["sketch_dim"], a[0]["steps"], b[0]["sketch_dim"], b[0]["steps"]) == (4, 2, 8, 3)
  assert (tmp_path / "recall-a-curve.png").stat().st_size > 0     # --eval-every: the curve plot
  assert not (tmp_path / "recall-b-curve.png").exists()
  merged = bench.main(["--merge", str(tmp_path / "recall-a.json"), str(tmp_path / "recall-b.json"),
                       "--out-dir", str(tmp_path), "--tag", "ab"])
  assert merged == a + b
  md = (tmp_path / "recall-ab.md").read_text()
  assert "| random+local (r = 4, 2 steps) |" in md and "| random+local (r = 8, 3 steps) |" in md
  assert "sketch_dim 4" in md and "sketch_dim 8" in md     # both files' setups
  # one variant, one configuration: the row is the variant's name
  bench.main(["--merge", str(tmp_path / "recall-a.json"), "--out-dir", str(tmp_path), "--tag", "a2"])
  assert "| random+local |" in (tmp_path / "recall-a2.md").read_text()


def _op_output(weights, v, bias):
  """o = sum_j w_ij v_j / (bias + sum_j w_ij) from weights [B, N, T, T], v [B, T, N, H]."""
  import numpy as np
  num = np.einsum("bnij,bjnh->binh", weights, np.asarray(v, np.float64))
  return num / (bias + weights.sum(-1).transpose(0, 2, 1))[..., None]


def test_probe_weights_reproduce_each_attention_op():
  """attention_weights gives the weights each op uses: normalised and applied to
  v they give the op's output (softmax, exact polynomial, PolySketch with and
  without exact local blocks)."""
  import jax
  import numpy as np
  from pallas_polysketch import polynomial_attention, polysketch_attention

  bench = load_bench("recall")
  B, T, N, H, r = 2, 32, 2, 8, 4
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q, k, v = (jax.random.normal(x, (B, T, N, H)) / 2 for x in ks[:3])
  fq, fk = (jax.random.normal(x, (B, T, N, r)) for x in ks[3:])
  call = dict(q=q, k=k, fq=fq, fk=fk, kwargs=dict(scale=0.3))
  w = bench.attention_weights("softmax", call)
  np.testing.assert_allclose(
      _op_output(w, v, 0.0), jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.3),
      rtol=1e-4, atol=1e-5)
  call["kwargs"] = dict(degree=4, normalization_bias=1.0)
  np.testing.assert_allclose(_op_output(bench.attention_weights("polynomial", call), v, 1.0),
                             polynomial_attention(q, k, v, degree=4), rtol=1e-4, atol=1e-5)
  for local_exact in (True, False):
    call["kwargs"] = dict(degree=4, block_size=8, local_exact=local_exact)
    np.testing.assert_allclose(
        _op_output(bench.attention_weights("polysketch", call), v, 1.0),
        polysketch_attention(q, k, v, fq, fk, degree=4, block_size=8, local_exact=local_exact,
                             implementation="xla"), rtol=1e-4, atol=1e-5)


def test_pair_shares_on_hand_built_weights():
  """The share is taken on the queried key's pair window (key, value, next
  token), the peak on one token before the query's block, each for the best
  head, over bias + the row's sum; chance is 3 / (i + 1)."""
  import numpy as np
  bench = load_bench("recall")
  T = 12
  inputs = np.array([[5, 9, 6, 10, 0, 3, 3, 3, 6, 10, 5, 9]])   # pairs (5, 9), (6, 10)
  mask = np.zeros((1, T)); mask[0, 8] = 1                         # query 6 at position 8
  w = np.tril(np.ones((1, 2, T, T)))
  w[0, 1, 8, 2:5] = [10.0, 4.0, 6.0]                             # head 1 finds the pair (6, 10)
  got = bench.pair_shares(w, inputs, mask, num_pairs=2, normalization_bias=1.0, block_size=4)
  # far: positions 0..7 (before the block 8..11): 1 + 1 + 10 + 4 + 6 + 1 + 1 + 1 of 27
  assert got == pytest.approx(dict(share=20.0 / (1.0 + 6 + 20), peak=10.0 / 27, far=25.0 / 27,
                                   chance=3.0 / 9))
  # block_size 8: position 8 starts a block, so the far tokens are 0..7 still
  assert bench.pair_shares(w, inputs, mask, 2, 1.0, block_size=8)["peak"] == pytest.approx(10 / 27)
  mask[0, 8], mask[0, 10] = 0, 1                                  # query 5 at 10, key 5 at 0
  w[0, 1, 10, 0] = 10.0
  got = bench.pair_shares(w, inputs, mask, 2)                     # no bias, every token far
  assert got == pytest.approx(dict(share=12.0 / 20, peak=10.0 / 20, far=19.0 / 20,
                                   chance=3.0 / 11))
  w[0, 1, 10, 0] = 0.0                                            # now head 0 is best: 3 of 11
  assert bench.pair_shares(w, inputs, mask, 2)["share"] == pytest.approx(3.0 / 11)


def test_probe_records_every_layer_and_restores_the_ops(tmp_path, capsys):
  import jax
  from pallas_polysketch import nn as ps_nn
  bench = load_bench("recall")
  originals = (jax.nn.dot_product_attention, ps_nn.polysketch_attention,
               ps_nn.polynomial_attention)
  runs = bench.main(["--seqs", "32", "--pairs", "2", "--queries", "4", "--steps", "2",
                     "--batch-size", "4", "--variants", "softmax,learned+local", "--dim", "16",
                     "--sketch-dim", "4", "--block-size", "8", "--eval-batches", "1", "--probe",
                     "--save-models", str(tmp_path / "models"),
                     "--out-dir", str(tmp_path), "--tag", "probe"])
  assert (jax.nn.dot_product_attention, ps_nn.polysketch_attention,
          ps_nn.polynomial_attention) == originals
  for r in runs:
    kind = "softmax" if r["variant"] == "softmax" else "polysketch"
    assert [x["kind"] for x in r["probe"]] == [kind, kind]        # 2 layers
    for x in r["probe"]:
      assert 0.0 < x["share"] <= 1.0 and 0.0 < x["chance"] < 1.0
      assert 0.0 < x["peak"] <= x["far"] <= 1.0
      assert ("exact_share" in x) == ("exact_far" in x) == (kind == "polysketch")
  assert "| learned+local | 32 | 2 |" in (tmp_path / "recall-probe.md").read_text()
  # the saved models are the trained ones: probing them again gives the recorded figures
  records = bench.main(["--reprobe", str(tmp_path / "models"), "--out-dir", str(tmp_path),
                        "--tag", "again"])
  assert [(x["variant"], x["seq"], x["pairs"], x["lr"], x["sketch_dim"]) for x in records] == [
      ("learned+local", 32, 2, 1e-3, 4), ("softmax", 32, 2, 1e-3, 4)]
  assert [x["probe"] for x in records] == [runs[1]["probe"], runs[0]["probe"]]
  md = (tmp_path / "recall-again-probe.md").read_text()
  assert "| learned+local | 32 | 2 | 0.001 | 4 | 2 | 1 |" in md
  # --eval-lengths: at the training length the saved models score what training
  # recorded; at others, the state grows for softmax only
  records = bench.main(["--eval-lengths", str(tmp_path / "models"), "--seqs", "32", "64",
                        "--out-dir", str(tmp_path), "--tag", "len"])
  by_variant = {r["variant"]: r for r in records}
  for run in runs:
    lengths = by_variant[run["variant"]]["lengths"]
    assert [x["seq"] for x in lengths] == [32, 64]
    assert lengths[0]["val_acc"] == pytest.approx(run["val_acc"], abs=1e-6)
  assert [x["state_floats"] for x in by_variant["softmax"]["lengths"]] == [2 * 32 * 8, 2 * 64 * 8]
  assert [x["state_floats"] for x in by_variant["learned+local"]["lengths"]] == [
      4 ** 2 * 9 + 2 * 8 * 8] * 2
  assert "| learned+local | 32 | 2 | 0.001 | 4 | 2 | " in (tmp_path / "recall-len-lengths.md").read_text()
  assert (tmp_path / "recall-len-lengths.png").stat().st_size > 0
  with pytest.raises(SystemExit):
    bench.main(["--eval-lengths", str(tmp_path / "absent"), "--out-dir", str(tmp_path)])
  # --init-from: training starts at the saved weights (at a learning rate of 0 it
  # stays there: the accuracy --eval-lengths measured at that length)
  softmax_dir = next(str(d) for d in (tmp_path / "models").iterdir() if d.name.startswith("softmax"))
  common = ["--pairs", "2", "--queries", "4", "--steps", "1", "--batch-size", "4", "--dim", "16",
            "--sketch-dim", "4", "--block-size", "8", "--eval-batches", "1",
            "--out-dir", str(tmp_path), "--init-from", softmax_dir]
  tuned = bench.main(common + ["--seqs", "64", "--lrs", "0", "--variants", "softmax",
                               "--tag", "tuned"])
  assert tuned[0]["init_from"] == os.path.basename(softmax_dir)
  assert tuned[0]["val_acc"] == pytest.approx(by_variant["softmax"]["lengths"][1]["val_acc"],
                                              abs=1e-6)
  assert (f"| softmax, from model {os.path.basename(softmax_dir)} |"
          in (tmp_path / "recall-tuned.md").read_text())
  # merged with the run whose model it started from, it joins that run's row
  bench.main(["--merge", str(tmp_path / "recall-probe.json"), str(tmp_path / "recall-tuned.json"),
              "--out-dir", str(tmp_path), "--tag", "chain"])
  md = (tmp_path / "recall-chain.md").read_text()
  assert (f"| softmax, length curriculum | {100 * runs[0]['val_acc']:.1f}% (lr 0.001) | "
          f"{100 * tuned[0]['val_acc']:.1f}% (lr 0) | {2 * 64 * 8:,} |") in md
  assert f"| learned+local | {100 * runs[1]['val_acc']:.1f}% (lr 0.001) | - |" in md
  assert "A curriculum row" in md and "from model" not in md
  # a table for another number of pairs lists only the rows that ran with it
  bench.main(common + ["--seqs", "64", "--lrs", "0", "--variants", "softmax", "--pairs", "3",
                       "--tag", "three"])
  bench.main(["--merge", str(tmp_path / "recall-probe.json"), str(tmp_path / "recall-tuned.json"),
              str(tmp_path / "recall-three.json"), "--out-dir", str(tmp_path), "--tag", "chain3"])
  md = (tmp_path / "recall-chain3.md").read_text()
  two, three = md.split("## 2 key-value pairs")[1].split("## 3 key-value pairs")
  three = three.split("## Where")[0]
  assert "| learned+local |" in two and "| learned+local" not in three
  assert "| softmax, length and pairs curriculum | - | " in three
  for extra, message in (
      (["--variants", "learned+local"], "is a softmax model: give --variants softmax"),
      (["--variants", "softmax", "--block-size", "4"], "{'block_size': (8, 4)}"),
      (["--variants", "softmax", "--eval-lengths", str(tmp_path / "models")],
       "got ['--eval-lengths', '--init-from']")):
    with pytest.raises(SystemExit):
      bench.main(common + ["--seqs", "64"] + extra)
    assert message in capsys.readouterr().err


# The benchmark's bookkeeping for one kind of rerun (rows, model names, merges):
# slow, to keep the default suite near 15 minutes.
@pytest.mark.slow
def test_polynomial_warmup_runs_get_their_own_row_model_name_and_reprobe(tmp_path):
  bench = load_bench("recall")
  common = ["--seqs", "32", "--pairs", "2", "--queries", "4", "--steps", "2", "--batch-size", "4",
            "--dim", "16", "--layers", "1", "--sketch-dim", "4", "--block-size", "8", "--eval-batches", "1",
            "--out-dir", str(tmp_path)]
  warm = bench.main(common + ["--variants", "softmax,learned+local", "--polynomial-warmup", "1",
                              "--save-models", str(tmp_path / "models"), "--tag", "warm"])
  # the warm-up applies to the PolySketch variants only
  assert [(r["variant"], r["polynomial_warmup"]) for r in warm] == [
      ("softmax", 0), ("learned+local", 1)]
  assert sorted((tmp_path / "models").iterdir())[0].name.endswith("-r4-steps2-pw1")
  plain = bench.main(common + ["--variants", "learned+local", "--tag", "plain"])
  bench.main(["--merge", str(tmp_path / "recall-warm.json"), str(tmp_path / "recall-plain.json"),
              "--out-dir", str(tmp_path), "--tag", "both"])
  md = (tmp_path / "recall-both.md").read_text()
  assert "| learned+local, polynomial warm-up 1 |" in md and "| learned+local |" in md
  assert plain[0]["polynomial_warmup"] == 0
  records = bench.main(["--reprobe", str(tmp_path / "models"), "--out-dir", str(tmp_path),
                        "--tag", "again"])
  assert [(x["variant"], x["polynomial_warmup"]) for x in records] == [
      ("learned+local", 1), ("softmax", 0)]
  with pytest.raises(SystemExit):
    bench.main(common + ["--variants", "learned+local", "--polynomial-warmup", "2"])
  # a second seed gets a model of its own; a name already there is refused before training
  bench.main(common + ["--variants", "learned+local", "--polynomial-warmup", "1", "--seed", "1",
                       "--save-models", str(tmp_path / "models"), "--tag", "seed1"])
  assert any(d.name.endswith("-pw1-seed1") for d in (tmp_path / "models").iterdir())
  with pytest.raises(SystemExit):
    bench.main(common + ["--variants", "learned+local", "--polynomial-warmup", "1", "--seed", "1",
                         "--save-models", str(tmp_path / "models"), "--tag", "seed1"])


def test_merged_chains_of_other_seeds_get_their_own_rows():
  bench = load_bench("recall")
  roots = [dict(variant="softmax", seq=64, pairs=2, lr=1e-3, sketch_dim=4, steps=10,
                polynomial_warmup=0, seed=seed) for seed in (0, 1)]
  child = dict(roots[1], seq=128, init_from="softmax-T64-pairs2-lr0.001-r4-steps10-seed1")
  orphan = dict(roots[1], seq=128, init_from="softmax-T64-pairs2-lr0.001-r4-steps10-seed2")
  assert bench.parent_run(child, roots + [child]) is roots[1]
  assert bench.parent_run(orphan, roots + [orphan]) is None
  labels, order = bench.row_labels(roots + [child])
  assert labels == ["softmax", "softmax, seed 1, length curriculum",
                    "softmax, seed 1, length curriculum"]
  assert order == labels[:2]
  assert bench.model_key(roots[0]) != bench.model_key(roots[1])


# The benchmark's bookkeeping for one kind of rerun (rows, model names, merges):
# slow, to keep the default suite near 15 minutes.
@pytest.mark.slow
def test_init_from_with_more_keys_grows_the_key_vocabulary(tmp_path, capsys):
  import dataclasses

  import jax.numpy as jnp
  import numpy as np
  bench = load_bench("recall")
  common = ["--seqs", "32", "--queries", "4", "--batch-size", "4", "--dim", "16", "--layers", "1",
            "--sketch-dim", "4", "--block-size", "8", "--eval-batches", "1",
            "--variants", "learned+local", "--out-dir", str(tmp_path)]
  bench.main(common + ["--pairs", "2", "--keys", "4", "--steps", "2",
                       "--save-models", str(tmp_path / "models"), "--tag", "four"])
  (saved_dir,) = (tmp_path / "models").iterdir()
  from pallas_polysketch.train import load_checkpoint
  saved = load_checkpoint(str(saved_dir))
  old = saved.model
  assert old.config.vocab_size == 1 + 4 + 8 + 8
  # the grown model computes what the saved one did on the old tokens, ids mapped
  new_config = dataclasses.replace(old.config, vocab_size=1 + 7 + 8 + 8)
  grown, keys_from = bench.grow_key_vocabulary(saved, new_config, 8, 8)
  assert keys_from == 4 and grown.optimizer is None
  tokens = np.random.default_rng(0).integers(0, old.config.vocab_size, (2, 32))
  mapped = np.where(tokens > 4, tokens + 3, tokens)
  logits_old = np.asarray(old(jnp.asarray(tokens)))
  logits_new = np.asarray(grown.model(jnp.asarray(mapped)))
  old_ids = np.concatenate([np.arange(5), np.arange(5, old.config.vocab_size) + 3])
  np.testing.assert_array_equal(logits_new[..., old_ids], logits_old)
  rows = np.linalg.norm(np.asarray(grown.model.embed.embedding[...]), axis=-1)
  assert rows[5:8].mean() == pytest.approx(rows[1:5].mean(), rel=1e-5)   # scaled to the old keys
  assert not np.allclose(rows[5:8], rows[1:4])                            # not copies of them
  # through --init-from: 6 pairs of 6 keys from the 4-key model, recorded on the run
  runs = bench.main(common + ["--pairs", "6", "--keys", "6", "--steps", "1", "--lrs", "0",
                              "--init-from", str(saved_dir), "--tag", "six"])
  assert [(r["pairs"], r["keys_from"], r["init_from"]) for r in runs] == [
      (6, 4, saved_dir.name)]
  bench.main(common + ["--pairs", "7", "--keys", "7", "--steps", "1", "--lrs", "0",
                       "--init-from", str(saved_dir), "--tag", "seven"])
  # merged, the chain is one row of a table against the number of pairs
  bench.main(["--merge"] + [str(tmp_path / f"recall-{t}.json") for t in ("four", "six", "seven")]
             + ["--out-dir", str(tmp_path), "--tag", "pairs"])
  md = (tmp_path / "recall-pairs.md").read_text()
  table = md.split("## Against the number of key-value pairs at T = 32")[1].split("##")[0]
  assert "| variant | 2 pairs | 6 pairs | 7 pairs | state per head |" in table
  assert "| learned+local, pairs curriculum | " in table
  assert (tmp_path / "recall-pairs-pairs.png").stat().st_size > 0
  with pytest.raises(SystemExit):
    bench.main(common + ["--pairs", "6", "--keys", "6", "--values", "9", "--steps", "1",
                         "--init-from", str(saved_dir), "--tag", "bad"])
  assert "the model trained with --values 8; only the key vocabulary can grow" in (
      capsys.readouterr().err)


# The benchmark's bookkeeping for one kind of rerun (rows, model names, merges):
# slow, to keep the default suite near 15 minutes.
@pytest.mark.slow
def test_a_narrower_learned_sketch_gets_its_own_row_model_name_and_chain(tmp_path):
  """--sketch-hidden: the model is built with it (its weights' shape), the run
  and its saved model's name record it, a merge keeps it apart from the
  default width's run, and --init-from continues it only with the same width."""
  bench = load_bench("recall")
  common = ["--seqs", "32", "--pairs", "2", "--queries", "4", "--steps", "1", "--batch-size", "4",
            "--dim", "16", "--layers", "1", "--sketch-dim", "4", "--block-size", "8", "--eval-batches", "1",
            "--variants", "learned+local", "--out-dir", str(tmp_path)]
  narrow = bench.main(common + ["--sketch-hidden", "8", "--save-models", str(tmp_path / "m"),
                                "--tag", "narrow"])
  wide = bench.main(common + ["--tag", "wide"])
  assert narrow[0]["sketch_hidden"] == 8 and "sketch_hidden" not in wide[0]
  (saved,) = (tmp_path / "m").iterdir()
  assert saved.name == "learned+local-T32-pairs2-lr0.001-r4-h8-steps1"
  assert bench.named_run(saved.name)["sketch_hidden"] == 8
  from pallas_polysketch.train import load_checkpoint
  model = load_checkpoint(str(saved)).model
  assert model.config.sketch_hidden_dim == 8
  assert model.blocks[0].attn.sketch["branch1"][1]["w_in"].shape == (4, 8)   # [r, hidden]
  bench.main(["--merge", str(tmp_path / "recall-narrow.json"), str(tmp_path / "recall-wide.json"),
              "--out-dir", str(tmp_path), "--tag", "both"])
  md = (tmp_path / "recall-both.md").read_text()
  assert "| learned+local, sketch hidden width 8 |" in md and "| learned+local |" in md
  grown = bench.main(common + ["--seqs", "64", "--sketch-hidden", "8", "--init-from", str(saved),
                               "--tag", "longer"])
  assert grown[0]["init_from"] == saved.name and grown[0]["sketch_hidden"] == 8
  with pytest.raises(SystemExit):   # the default width cannot start from the narrow model
    bench.main(common + ["--seqs", "64", "--init-from", str(saved), "--tag", "mismatch"])
