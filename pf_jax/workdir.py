"""Human-readable files a run keeps in its workdir, beside `checkpoints/` and the events.

- `config.json`: the resolved config of the run (written at its start);
- `results.json`: the final evaluation of a finished run (`{"step": N, "eval/<set>/top1": ...}`).

One run per workdir: `check_config` refuses to continue a run with a config that differs in
anything but `SAFE_TO_CHANGE`.

Paths go through `etils.epath`, so `gs://` workdirs work like local ones.
"""

import json
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from pf_jax import config_fields

CONFIG_FILE = "config.json"
# Fields a run may continue with new values (docs/runs-safe.md): they change neither the
# training trajectory nor the meaning of the results. Declared with each field.
SAFE_TO_CHANGE = config_fields.SAFE_TO_CHANGE
# Runs stored before options that can be off became None (or "none") wrote these values for off.
_STORED_OFF = {
  "sam.rho_min": -1.0,
  "sam.obf_alpha": -1.0,
  "sam.asam": "",
  "num_train_steps": -1,
  "warmup_steps": -1,
  "clip_grad_norm": 0.0,
  "shrink_perturb": 0.0,
  "init_from": "",
  "analysis.dataset": "",
  "analysis.collect_every_steps": 0,
}
OVERRIDE_FLAG = "--allow_config_change"
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
  stored = json.loads(path.read_text())
  for name, off in _STORED_OFF.items():  # earlier runs' "off" values
    *groups, leaf = name.split(".")
    holder = stored
    for g in groups:
      holder = holder.get(g, {})
    if leaf in holder and holder[leaf] == off and not isinstance(holder[leaf], bool):
      holder[leaf] = "none" if name == "sam.asam" else None
  return ml_collections.ConfigDict(stored)


def save_results(workdir, step: int, results: dict[str, float]) -> None:
  _write_json(epath.Path(workdir) / RESULTS_FILE, dict(results, step=int(step)))


def load_results(workdir) -> dict[str, float]:
  path = epath.Path(workdir) / RESULTS_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: has the run in {workdir!r} finished?")
  return json.loads(path.read_text())


class ConfigMismatchError(ValueError):
  """A workdir holds a run whose config differs from the new one."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: a nested config dict keyed by dotted field names."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(
  stored: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> list[str]:
  """One line per field outside SAFE_TO_CHANGE that differs: 'config.f: OLD in this workdir, NEW now'."""
  old = flatten(json.loads(stored.to_json_best_effort()))
  now = flatten(json.loads(new.to_json_best_effort()))  # JSON round trip: tuples == lists
  show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"
  return [
    f"config.{k}: {show(old, k)} in this workdir, {show(now, k)} now"
    for k in sorted(set(old) | set(now))
    if k not in SAFE_TO_CHANGE and old.get(k, ...) != now.get(k, ...)
  ]


def check_config(
  workdir, config: ml_collections.ConfigDict, *, has_run: bool, allow_change: bool = False
) -> None:
  """Refuses (ConfigMismatchError) to continue the run in `workdir` with a different config.

  `has_run`: the workdir holds training progress (a checkpoint); without one nothing can be mixed
  and the stored config is simply replaced. With `allow_change` the differences are logged and the
  old config is kept as config.<N>.json (N = 1, 2, ...).
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not has_run or not path.exists():
    return
  diffs = config_differences(load_config(workdir), config)
  if not diffs:
    return
  if not allow_change:
    raise ConfigMismatchError(
      "\n".join(
        diffs
        + [
          f"{workdir} holds a run with another config: use a new --workdir, or pass {OVERRIDE_FLAG} to "
          f"continue it with the new values (safe to change: {', '.join(SAFE_TO_CHANGE)})"
        ]
      )
    )
  i = 1
  while (epath.Path(workdir) / f"config.{i}.json").exists():
    i += 1
  path.rename(epath.Path(workdir) / f"config.{i}.json")
  for line in diffs:
    logging.warning("Continuing with a changed config (%s): %s", OVERRIDE_FLAG, line)
