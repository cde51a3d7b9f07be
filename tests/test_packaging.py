"""The package installs as one top-level name, with the references inside it."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pallas_polysketch
import pallas_polysketch.ref

ROOT = Path(__file__).resolve().parents[1]


def _clean_env():
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def test_ref_is_a_subpackage():
  assert pallas_polysketch.ref.__name__ == "pallas_polysketch.ref"
  for name in ("polynomial_attention", "polysketch_attention_quadratic",
               "polysketch_attention_blocked", "polysketch_weights",
               "random_sketch_init", "random_sketch_features",
               "learned_sketch_init", "learned_sketch_features", "self_tensor"):
    assert callable(getattr(pallas_polysketch.ref, name)), name


def test_installed_import_claims_no_top_level_ref(tmp_path):
  """In a fresh interpreter outside the source tree, `pallas_polysketch.ref`
  imports and the generic name `ref` does not resolve to our references."""
  script = (
      "import importlib.util, json, pallas_polysketch, pallas_polysketch.ref as r\n"
      "spec = importlib.util.find_spec('ref')\n"
      "print(json.dumps({'ref': r.__file__, 'version': pallas_polysketch.__version__,\n"
      "                  'top_ref': spec and spec.origin}))\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_clean_env(),
                       capture_output=True, text=True, check=True)
  info = json.loads(out.stdout.strip().splitlines()[-1])
  assert info["version"] == pallas_polysketch.__version__
  ref_dir = Path(info["ref"]).resolve().parent
  assert ref_dir == Path(pallas_polysketch.ref.__file__).resolve().parent
  top = info["top_ref"]
  assert top is None or Path(top).resolve().parent != ref_dir, top


def test_nn_and_models_are_attributes_after_import(tmp_path):
  """`import pallas_polysketch as ps` then `ps.nn` / `ps.models`, like `jax.nn`: in a
  fresh interpreter (no earlier import of the submodules), loaded on first use."""
  script = (
      "import json, sys, pallas_polysketch as ps\n"
      "flax_at_import = 'flax' in sys.modules\n"
      "from pallas_polysketch.nn import PolySketchAttention\n"
      "from pallas_polysketch.models.gpt import GPT\n"
      "print(json.dumps({'flax_at_import': flax_at_import,\n"
      "                  'nn': ps.nn.PolySketchAttention is PolySketchAttention,\n"
      "                  'gpt': ps.models.gpt.GPT is GPT and ps.models.GPT is GPT,\n"
      "                  'dir': [n for n in ('nn', 'models') if n in dir(ps)],\n"
      "                  'bogus': hasattr(ps, 'no_such_name')}))\n")
  # the submodules first through the package attribute, then the other order
  for first in ("ps.nn.PolySketchAttention; ps.models.gpt.GPT\n", "ps.models.gpt; ps.nn\n"):
    lines = script.split("\n")
    code = "\n".join(lines[:2] + [first] + lines[2:])
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {"flax_at_import": False, "nn": True, "gpt": True,
                    "dir": ["nn", "models"], "bogus": False}, info


def test_version():
  parts = pallas_polysketch.__version__.split(".")
  assert len(parts) == 3 and all(p.isdigit() for p in parts)


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_wheel_contents_and_import(tmp_path):
  """Build a wheel from a copy of the sources (pip, isolated build), check its
  file list, and import the references from the wheel itself."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    if (ROOT / name).exists():
      shutil.copy(ROOT / name, src / name)
  for name in ("pallas_polysketch", "ref"):
    shutil.copytree(ROOT / name, src / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                  str(src)], check=True, capture_output=True, text=True)
  (wheel,) = dist.glob("pallas_polysketch-*.whl")
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zf.read(top_level[0]).decode().split() == ["pallas_polysketch"]
    entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
  assert "pallas_polysketch/ref/__init__.py" in names
  assert "pallas_polysketch/ref/attention.py" in names
  assert not [n for n in names if n.startswith("ref/")], names
  assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
      "pallas_polysketch"}
  assert "polysketch-demo = pallas_polysketch.demo:main" in entry_points

  # A pure-Python wheel is importable as a zip: the references load from it.
  script = (f"import sys; sys.path.insert(0, {str(wheel)!r})\n"
            "import pallas_polysketch.ref as r; print(r.__file__)")
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_clean_env(),
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip().startswith(str(wheel)), out.stdout
