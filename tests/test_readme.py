"""The README's example runs, and its two commands are the ones CI runs."""
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="needs the source tree")


def test_readme_example_runs(capsys):
  block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
  exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
  shape, error = capsys.readouterr().out.strip().rsplit(")", 1)
  assert shape.strip() + ")" == "(1, 512, 4, 64)"
  assert 0.0 < float(error) < 1.0 and np.isfinite(float(error))


def test_readme_has_two_fresh_machine_commands():
  commands = [line.strip() for line in README.read_text().splitlines()
              if line.strip().startswith("python3 -m venv")]
  assert len(commands) == 2, commands
  demo, tests = commands
  assert demo.endswith("polysketch-demo")
  assert tests.endswith("pytest")
  ci = (ROOT / ".ci" / "run").read_text()
  for step in tests.split(" && "):  # .ci/run runs the README's test command
    assert step in ci, step


def test_readme_python_blocks_run_in_order(capsys):
  """Every ```python block of the README, run one after the other (later ones
  use the earlier ones' names), on the 8 CPU devices of the test process."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 6
  scope = {"__name__": "readme_example"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"{README}:block{i}", "exec"), scope)
  assert scope["tokens"].shape == (16,)
  assert scope["out"].shape == (1, 512, 4, 64)
  assert int(scope["state"].fill[0]) == 310 % 256
