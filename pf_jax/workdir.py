"""Human-readable files a run keeps in its workdir, beside `checkpoints/` and the events.

- `config.json`: the resolved config of the run (written at its start);
- `results.json`: the final evaluation of a finished run (`{"step": N, "eval/<set>/top1": ...}`).

Paths go through `etils.epath`, so `gs://` workdirs work like local ones.
"""
import json
from typing import Any, Dict

from etils import epath
import ml_collections

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


def _write_json(path: epath.Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)  # a reader never sees half a file; replaces an earlier one


def save_config(workdir, config: ml_collections.ConfigDict) -> None:
  _write_json(epath.Path(workdir) / CONFIG_FILE, json.loads(config.to_json_best_effort()))


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a run was started with (lists where the config had tuples)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a pf_jax workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def save_results(workdir, step: int, results: Dict[str, float]) -> None:
  _write_json(epath.Path(workdir) / RESULTS_FILE, dict(results, step=int(step)))


def load_results(workdir) -> Dict[str, float]:
  path = epath.Path(workdir) / RESULTS_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: has the run in {workdir!r} finished?")
  return json.loads(path.read_text())
