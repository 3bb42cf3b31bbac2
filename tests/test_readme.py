"""The README's "use it in your own Flax loop" code must run as pasted."""
import pathlib
import re

import numpy as np


def test_readme_example_runs(capsys):
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  block = re.search(r"<!-- readme-example:start -->\s*```python\n(.*?)```", text, re.S).group(1)
  scope = {}
  exec(compile(block, "README.md", "exec"), scope)
  state = scope["opt_state"]
  assert float(state.metrics["rho"]) == np.float32(0.6)
  assert int(state.count) == 20
  assert np.isfinite(float(state.metrics["loss"]))
  assert "loss at theta" in capsys.readouterr().out
