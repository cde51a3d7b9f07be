"""bench/gpt_step.py's arithmetic (no libtpu): the rest-of-step model through
four compiles, the step sums and the crossover."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))
import bundles  # noqa: E402
import gpt_step  # noqa: E402


def _record(att, layers, T, cycles):
  sched = bundles.Schedule("fusion.1", cycles, ()).to_json()
  return dict(job=dict(op="gpt", attention=att, layers=layers, T=T), schedules=[sched],
              calls={"fusion.1": 1})


def _truth(att, layers, T):
  a, b, c, d = (1000, 50, 3, 7) if att == "polysketch" else (900, 40, 2, 6)
  return a + b * layers + c * T + d * layers * T


def test_rest_model_recovers_a_bilinear_program():
  recs = [_record(a, l, t, _truth(a, l, t)) for a in gpt_step.ATTENTIONS
          for l in gpt_step.COMPILE_LAYERS for t in gpt_step.COMPILE_SEQS]
  model = gpt_step.rest_model(recs)
  for att in gpt_step.ATTENTIONS:
    for layers, T in ((12, 32768), (12, 1024), (3, 131072)):
      assert gpt_step.rest_cycles(model, att, layers, T) == pytest.approx(_truth(att, layers, T))


def test_rest_model_reports_a_failed_compile():
  recs = [_record(a, l, t, 1) for a in gpt_step.ATTENTIONS
          for l in gpt_step.COMPILE_LAYERS for t in gpt_step.COMPILE_SEQS]
  recs[0]["error"] = "RESOURCE_EXHAUSTED: out of HBM"
  with pytest.raises(RuntimeError, match="out of HBM"):
    gpt_step.rest_model(recs)


def test_step_sums_and_crossover():
  model = {a: dict(coef=(0.0, 0.0, 10.0, 0.0)) for a in gpt_step.ATTENTIONS}   # rest = 10 T
  rows = []
  for T in gpt_step.REPORT_SEQS:
    # ours linear, the anchor quadratic: the anchor loses from some T on
    rows.append(dict(gen="v5e", H=64, mode="vjp", T=T, speedup=1.0,
                     ours_cycles=2.0 * T, ours_cycles_conservative=3.0 * T,
                     anchor_cycles=T * T / 4096, anchor="splash"))
  got = gpt_step.report("v5e", model, rows, clock_hz=1e9)
  by_T = {r["T"]: r for r in got}
  r = by_T[32768]
  assert r["step_polysketch"] == 10 * 32768 + 12 * 2.0 * 32768
  assert r["step_polysketch_conservative"] == 10 * 32768 + 12 * 3.0 * 32768
  assert r["step_softmax"] == 10 * 32768 + 12 * 32768 ** 2 / 4096
  assert r["speedup"] == r["step_softmax"] / r["step_polysketch"]
  # cons. faster where 12 T^2 / 4096 > 36 T, i.e. T > 12288
  assert gpt_step.tpu_schedule.crossover(got) == 16384
  assert all(by_T[T]["speedup_conservative"] > 1 for T in by_T if T >= 16384)
  assert by_T[8192]["speedup_conservative"] < 1
  # rest cancels: 12 T^2 / 4096 = 36 T at T = 12288, exact for a quadratic anchor
  assert gpt_step.break_even(got) == pytest.approx(12288, rel=1e-9)
  # no crossover inside the rows: none
  assert gpt_step.break_even([r for r in got if r["T"] <= 8192]) is None


@pytest.mark.slow          # four GPT compiles, ~1-2 min on 2 cores
@pytest.mark.tpu_compile
def test_stubbed_step_compiles_for_tpu_and_counts():
  """A tiny GPT's training step, attention stubbed, compiled for v5e (needs
  libtpu): every op of the program is counted, the PolySketch model's (with
  the learned sketch features) more than softmax's, and more layers cost more."""
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu not installed")
  import tpu_schedule
  tiny = dict(vocab_size=128, num_heads=2, embed_dim=64, block_size=32, sketch_dim=8)
  jobs = [dict(op="gpt", attention=a, layers=l, T=256, B=1, N=2, H=32, r=8, block="gpt",
               config=tiny) for a in gpt_step.ATTENTIONS for l in (1, 2)]
  recs = tpu_schedule.run_jobs("v5e", jobs)
  cycles = {}
  for rec in recs:
    assert "error" not in rec, rec.get("error")
    assert rec["calls"], "no TLP calls parsed"
    j = rec["job"]
    cycles[(j["attention"], j["layers"])] = tpu_schedule.summarise_program([rec], [256])["compiled"][256]
  assert cycles[("polysketch", 1)] > cycles[("softmax", 1)]
  for a in gpt_step.ATTENTIONS:
    assert cycles[(a, 2)] > cycles[(a, 1)] > 0


def test_rereport_from_json(tmp_path):
  """--from-json: a saved rest model re-reported against a schedule table."""
  import json
  sched_rows = [dict(gen="v5e", H=64, mode="vjp", T=T, speedup=1.0, ours_cycles=T,
                     ours_cycles_conservative=2 * T, anchor_cycles=T * T / 1024,
                     anchor="flash") for T in gpt_step.REPORT_SEQS]
  (tmp_path / "sched.json").write_text(json.dumps(dict(rows=sched_rows)))
  rest = {a: dict(coef=[0.0, 0.0, 1.0, 0.0]) for a in gpt_step.ATTENTIONS}
  (tmp_path / "saved.json").write_text(json.dumps(dict(generations={"v5e": dict(rest=rest)})))
  tag = str(tmp_path / "out")
  assert gpt_step.main(["--from-json", str(tmp_path / "saved.json"), "--schedule",
                        str(tmp_path / "sched.json"), "--tag", tag]) == 0
  doc = json.loads((tmp_path / "out.json").read_text())
  rows = {r["T"]: r for r in doc["generations"]["v5e"]["rows"]}
  assert rows[32768]["step_polysketch"] == 32768 + 12 * 32768
  assert rows[32768]["step_softmax"] == 32768 + 12 * 32768 ** 2 / 1024
  assert "| 32768 |" in (tmp_path / "out.md").read_text()


def test_rereport_merges_generations_of_several_files(tmp_path):
  import json
  sched_rows = [dict(gen=g, H=64, mode="vjp", T=T, speedup=1.0, ours_cycles=T,
                     ours_cycles_conservative=T, anchor_cycles=T * T / 1024, anchor="flash")
                for g in ("v4", "v5e") for T in gpt_step.REPORT_SEQS]
  (tmp_path / "sched.json").write_text(json.dumps(dict(rows=sched_rows)))
  head = dict(libtpu="1.0", config=gpt_step.GPT2_SMALL, layers=12, compile_layers=[1, 2],
              compile_seqs=[2048, 8192])
  rest = lambda c: {a: dict(coef=[0.0, 0.0, c, 0.0]) for a in gpt_step.ATTENTIONS}
  (tmp_path / "a.json").write_text(json.dumps(dict(head, generations={"v5e": dict(rest=rest(1.0))})))
  (tmp_path / "b.json").write_text(json.dumps(dict(head, generations={"v4": dict(rest=rest(2.0))})))
  tag = str(tmp_path / "out")
  assert gpt_step.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                        "--schedule", str(tmp_path / "sched.json"), "--tag", tag]) == 0
  gens = json.loads((tmp_path / "out.json").read_text())["generations"]
  assert {g: gens[g]["rows"][0]["rest_softmax"] for g in gens} == {"v5e": 1024.0, "v4": 2048.0}
  # FILE:GEN takes only that generation: b2's v5e (copied by --rest-from) does not win.
  (tmp_path / "b2.json").write_text(json.dumps(dict(
      head, generations={"v4": dict(rest=rest(3.0)), "v5e": dict(rest=rest(5.0))})))
  assert gpt_step.main(["--from-json", str(tmp_path / "a.json"), f"{tmp_path / 'b2.json'}:v4",
                        "--schedule", str(tmp_path / "sched.json"), "--tag", tag]) == 0
  gens = json.loads((tmp_path / "out.json").read_text())["generations"]
  assert {g: gens[g]["rows"][0]["rest_softmax"] for g in gens} == {"v5e": 1024.0, "v4": 3072.0}
  with pytest.raises(SystemExit, match="no generation v6e"):
    gpt_step.main(["--from-json", str(tmp_path / "a.json"), f"{tmp_path / 'b2.json'}:v6e",
                   "--schedule", str(tmp_path / "sched.json"), "--tag", tag])
  (tmp_path / "c.json").write_text(json.dumps(dict(head, libtpu="2.0", generations={})))
  with pytest.raises(SystemExit, match="another libtpu"):
    gpt_step.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "c.json"),
                   "--schedule", str(tmp_path / "sched.json"), "--tag", tag])


def test_a_schedule_without_the_rows_fails_before_compiling(tmp_path):
  import json
  (tmp_path / "old.json").write_text(json.dumps(dict(rows=[dict(
      gen="v5e", H=64, mode="vjp", T=32768, speedup=9.0, ours_cycles=1.0,
      ours_cycles_conservative=1.0, flash_cycles=9.0)])))     # an older format
  with pytest.raises(SystemExit, match="anchor_cycles"):
    gpt_step.main(["--gens", "v5e", "--schedule", str(tmp_path / "old.json"),
                   "--tag", str(tmp_path / "x")])


def test_compiling_one_attention_keeps_the_others_rest_only_when_comparable(tmp_path, monkeypatch):
  """--attentions polysketch merges into <tag>.json; it refuses a file compiled
  with another libtpu or model, or without the kept model's rest."""
  import json
  import types
  monkeypatch.setattr(gpt_step.tpu_schedule, "RESULTS", str(tmp_path))
  doc = dict(libtpu="1.0", config=gpt_step.GPT2_SMALL, layers=gpt_step.LAYERS,
             compile_layers=list(gpt_step.COMPILE_LAYERS), compile_seqs=list(gpt_step.COMPILE_SEQS),
             generations={"v5e": dict(rest={"softmax": dict(coef=[1, 2, 3, 4])})})
  args = types.SimpleNamespace(tag="g", gens=["v5e"], attentions=["polysketch"], rest_from=None,
                               sketch_hidden=None)
  with pytest.raises(SystemExit, match="missing"):
    gpt_step._kept_rest(args, "1.0")
  path = tmp_path / "g.json"
  path.write_text(json.dumps(doc))
  assert gpt_step._kept_rest(args, "1.0")["generations"]["v5e"]["rest"]["softmax"]["coef"] == [1, 2, 3, 4]
  with pytest.raises(SystemExit, match="libtpu 1.0, this is 2.0"):
    gpt_step._kept_rest(args, "2.0")
  with pytest.raises(SystemExit, match="no v6e rest"):
    gpt_step._kept_rest(types.SimpleNamespace(**dict(vars(args), gens=["v6e"])), "1.0")
  path.write_text(json.dumps(dict(doc, config=dict(gpt_step.GPT2_SMALL, sketch_dim=16))))
  with pytest.raises(SystemExit, match="other config"):
    gpt_step._kept_rest(args, "1.0")


def test_a_narrower_sketch_keeps_the_softmax_rest_of_another_json(tmp_path, monkeypatch):
  """--attentions polysketch --sketch-hidden N --rest-from J: the softmax rest
  (independent of the sketch) comes from J, only for the generations compiled
  now, under the new config; the softmax rest is never reused for a changed
  sketch width when softmax is what is compiled, nor across other changes."""
  import json
  import types
  monkeypatch.setattr(gpt_step.tpu_schedule, "RESULTS", str(tmp_path))
  doc = dict(libtpu="1.0", **gpt_step._compiled_with(),
             generations={g: dict(rest={a: dict(coef=[i, 2, 3, 4]) for i, a in
                                        enumerate(gpt_step.ATTENTIONS)}) for g in ("v5e", "v4")})
  (tmp_path / "full.json").write_text(json.dumps(doc))
  args = types.SimpleNamespace(tag="narrow", gens=["v5e"], attentions=["polysketch"],
                               rest_from=str(tmp_path / "full.json"), sketch_hidden=128)
  kept = gpt_step._kept_rest(args, "1.0")
  assert kept["config"] == dict(gpt_step.GPT2_SMALL, sketch_hidden_dim=128)
  assert kept["generations"] == {"v5e": dict(rest={"softmax": dict(coef=[1, 2, 3, 4])})}
  assert gpt_step._compiled_with(128)["config"]["sketch_hidden_dim"] == 128
  assert "sketch_hidden_dim" not in gpt_step._compiled_with()["config"]
  with pytest.raises(SystemExit, match="other config"):
    gpt_step._kept_rest(types.SimpleNamespace(**dict(vars(args), attentions=["softmax"])), "1.0")
  (tmp_path / "other.json").write_text(json.dumps(dict(doc, config=dict(doc["config"], sketch_dim=16))))
  with pytest.raises(SystemExit, match="other config"):
    gpt_step._kept_rest(types.SimpleNamespace(**dict(vars(args), rest_from=str(tmp_path / "other.json"))),
                        "1.0")
  with pytest.raises(SystemExit):
    gpt_step.main(["--from-json", str(tmp_path / "full.json"), "--sketch-hidden", "128"])
  with pytest.raises(SystemExit):
    gpt_step.main(["--rest-from", str(tmp_path / "full.json")])
