"""GPT model, data, training script and checkpoints (CPU, small)."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_polysketch.models.gpt import GPT, CharTokenizer, GPTConfig, generate
from pallas_polysketch.nn import SketchVariable
from pallas_polysketch import train as train_mod

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# 30 steps of the small model below take the val loss from ln(vocab) ~ 4.1 to 3.09
# on this corpus (measured); unigram statistics alone give ~3.3.
SMOKE_MAX_LOSS = 3.25


def test_char_tokenizer_roundtrip():
  tok = CharTokenizer.from_text("hello world\n")
  ids = tok.encode("world hello")
  assert ids.dtype == np.int32 and tok.vocab_size == 9
  assert tok.decode(ids) == "world hello"
  assert CharTokenizer.from_json(tok.to_json()).chars == tok.chars
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tok.encode("xyz")


def test_text_data_split_and_fixed_val():
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  data = train_mod.TextData(text)
  assert len(data.train_ids) == 900 and len(data.val_ids) == 100
  assert data.tokenizer.decode(data.val_ids) == text[900:]
  a = data.val_batches(2, 3, 16)
  b = data.val_batches(2, 3, 16)
  for (x1, y1, m1), (x2, y2, _) in zip(a, b):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])  # targets are next tokens
    assert m1.shape == (3, 16) and m1.all()


def test_recall_data_answers_are_recallable():
  data = train_mod.RecallData(num_keys=8, num_values=8, num_noise=4, num_pairs=4, num_queries=6)
  x, y, mask = data.train_batch(np.random.default_rng(0), 5, 40)
  assert x.shape == y.shape == mask.shape == (5, 40)
  assert mask.sum() == 5 * 6
  for row in range(5):
    pairs = {int(x[row, 2 * i]): int(x[row, 2 * i + 1]) for i in range(4)}
    assert len(pairs) == 4  # distinct keys
    for t in np.nonzero(mask[row])[0]:
      assert int(y[row, t]) == pairs[int(x[row, t])]


def _tiny_config(**kw):
  base = dict(vocab_size=20, num_layers=1, num_heads=2, embed_dim=16, sketch_dim=8,
              block_size=8)
  base.update(kw)
  return GPTConfig(**base)


def test_gpt_shapes_and_tied_embeddings():
  model = GPT(_tiny_config(num_layers=2), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 12), jnp.int32)
  call = nnx.jit(lambda m, t: m(t))
  logits = call(model, tokens)
  assert logits.shape == (2, 12, 20) and logits.dtype == jnp.float32
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "embed/embedding" in names and not any("lm_head" in n for n in names)
  # causal: changing a later token leaves earlier logits unchanged
  logits2 = call(model, tokens.at[:, 8].set(5))
  np.testing.assert_allclose(logits[:, :8], logits2[:, :8], rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits[:, 8:], logits2[:, 8:])


@pytest.mark.parametrize("sketch", ["random", "learned"])
def test_checkpoint_roundtrip_identical_outputs(tmp_path, sketch):
  cfg = _tiny_config(sketch=sketch)
  model = GPT(cfg, rngs=nnx.Rngs(7))  # load_checkpoint builds with seed 0: must be overwritten
  tok = CharTokenizer.from_text("abcdefghijklmnopqrst")
  path = str(tmp_path / "ckpt.msgpack")
  train_mod.save_checkpoint(path, model, tokenizer=tok, extra={"step": 3})
  restored, tok2, extra = train_mod.load_checkpoint(path)
  assert restored.config == cfg and tok2.chars == tok.chars and extra == {"step": 3}
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 20)
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(restored(tokens)))
  fresh = GPT(cfg, rngs=nnx.Rngs(0))
  assert not np.array_equal(np.asarray(fresh(tokens)), np.asarray(restored(tokens)))
  if sketch == "random":  # the fixed sketch travels with the checkpoint
    assert nnx.state(restored, SketchVariable)


def test_checkpoint_rejects_other_model(tmp_path):
  path = str(tmp_path / "ckpt.msgpack")
  train_mod.save_checkpoint(path, GPT(_tiny_config(), rngs=nnx.Rngs(0)))
  import flax.serialization as ser
  payload = ser.msgpack_restore(open(path, "rb").read())
  payload["config"] = _tiny_config(num_layers=2).to_json()
  open(path, "wb").write(ser.msgpack_serialize(payload))
  with pytest.raises(ValueError, match="does not match"):
    train_mod.load_checkpoint(path)


def test_generate_compiles_once_and_is_in_vocab():
  model = GPT(_tiny_config(), rngs=nnx.Rngs(0))
  out = generate(model, [1, 2, 3], 5, key=jax.random.key(0), context=8)
  assert out.shape == (5,) and out.min() >= 0 and out.max() < 20


def test_smoke_training_on_shakespeare_slice(tmp_path):
  if not SHAKESPEARE.exists():
    pytest.skip(f"corpus not found at {SHAKESPEARE} (expected <repo>/../shared/data)")
  text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
  data_path = tmp_path / "slice.txt"
  data_path.write_text(text, encoding="utf-8")
  ckpt, res_path = tmp_path / "model.msgpack", tmp_path / "results.json"
  results = train_mod.main([
      "--data", str(data_path), "--steps", "30", "--layers", "1", "--heads", "2",
      "--dim", "32", "--context", "64", "--batch-size", "16", "--block-size", "16",
      "--sketch-dim", "8", "--lr", "1e-2", "--warmup", "5", "--eval-every", "30",
      "--eval-batches", "2", "--no-progress", "--sample", "0",
      "--checkpoint", str(ckpt), "--results", str(res_path)])
  first = results["history"]["train_loss"][0]
  assert first > 3.5  # starts near ln(vocab)
  print("smoke val loss", results["val_loss"])
  assert results["val_loss"] < SMOKE_MAX_LOSS, results["val_loss"]
  saved = json.loads(res_path.read_text())
  assert saved["val_loss"] == results["val_loss"] and saved["model"]["attention"] == "polysketch"
  # the checkpoint reproduces the final validation loss
  model, tok, extra = train_mod.load_checkpoint(str(ckpt))
  data = train_mod.TextData(text)
  assert tok.chars == data.tokenizer.chars
  batches = data.val_batches(2, 16, 64)
  loss_fn = nnx.jit(train_mod.loss_fn)
  losses = [float(loss_fn(model, *b)[0]) for b in batches]
  assert math.isclose(np.mean(losses), extra["val_loss"], rel_tol=1e-4)


def test_cli_rejects_bad_flags():
  with pytest.raises(SystemExit):
    train_mod.build_parser().parse_args(["--attention", "flash"])
  with pytest.raises(SystemExit):
    train_mod.build_parser().parse_args(["--local-exact", "maybe"])


def test_demo_console_entry_exits_zero(capsys):
  """`polysketch-demo` is `sys.exit(demo.main())`: it must return 0, not a dict."""
  from pallas_polysketch import demo
  assert demo.main(["--steps", "2", "--eval-every", "2", "--eval-batches", "1",
                    "--batch-size", "2", "--context", "128", "--no-progress"]) == 0
  assert "final val loss" in capsys.readouterr().out


# --- packed documents (issue 12) -------------------------------------------------

def test_gpt_packed_documents_equal_each_alone():
  model = GPT(_tiny_config(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 30), 0, 20)
  ids = jnp.asarray([[0] * 11 + [1] + [0] * 18, [5] * 9 + [6] * 21], jnp.int32)
  call = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
  packed = call(model, tokens, ids)
  for b, s, e in [(0, 11, 12), (0, 12, 30), (1, 9, 30)]:
    alone = call(model, tokens[b:b + 1, s:e], None)
    np.testing.assert_allclose(packed[b:b + 1, s:e], alone, rtol=1e-4, atol=1e-5,
                               err_msg=str((b, s, e)))


def test_text_data_packs_documents_with_segment_ids():
  text = "ab|cde|f|" * 20 + "ghij|"
  data = train_mod.TextData(text, separator="|", val_fraction=0.2)
  assert data.num_documents == 61   # the last separator ends the text
  np.testing.assert_array_equal(train_mod.document_index("ab||c", "|"), [0, 0, 0, 1, 2])
  np.testing.assert_array_equal(train_mod.document_index("a::b", "::"), [0, 0, 0, 1])
  x, y, mask, seg = data.train_batch(np.random.default_rng(0), 4, 12)
  assert x.shape == y.shape == mask.shape == seg.shape == (4, 12) and seg.dtype == np.int32
  for row in range(4):
    chars = data.tokenizer.decode(x[row])
    assert seg[row, 0] == 0 and np.all(np.diff(seg[row]) >= 0)
    for t in range(1, 12):   # a new segment starts exactly after each separator
      assert (seg[row, t] != seg[row, t - 1]) == (chars[t - 1] == "|")
    # targets that start a document are not scored
    np.testing.assert_array_equal(mask[row] == 0, np.asarray([c == "|" for c in chars]))
  for batch in data.val_batches(2, 3, 12):
    assert len(batch) == 4


def test_pack_separator_tiny_run(tmp_path, capsys):
  docs = ["the cat sat on the mat", "a dog ran", "birds sing at dawn and dusk", "ok"]
  path = tmp_path / "docs.txt"
  path.write_text("\n\n".join(docs * 30), encoding="utf-8")
  results = train_mod.main([
      "--data", str(path), "--pack-separator", "\\n\\n", "--steps", "3", "--layers", "1",
      "--heads", "2", "--dim", "16", "--context", "32", "--batch-size", "4",
      "--block-size", "8", "--sketch-dim", "4", "--eval-every", "3", "--eval-batches", "1",
      "--no-progress", "--sample", "0"])
  assert math.isfinite(results["val_loss"])
  assert "120 documents packed by '\\n\\n'" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    train_mod.main(["--pack-separator", "|", "--steps", "1"])   # needs --data
  with pytest.raises(SystemExit):
    train_mod.build_parser().parse_args(["--pack-separator", ""])
