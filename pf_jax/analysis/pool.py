"""A pool of finished runs: their labels, accuracies and measures (Figure 2, Tables 1 and B.1).

A run is a workdir with `config.json`, `results.json` (a finished run), optionally
`sharpness.json` and `forgetting/step_*.npz`. Runs that differ only in their seed (and in fields
that do not change training, `config_fields.SAFE_TO_CHANGE`) form one group.
"""

import dataclasses
import json
import os

import numpy as np

from pf_jax import config_fields
from pf_jax import workdir as workdir_lib
from pf_jax.analysis import collect
from pf_jax.analysis import forgetting
from pf_jax.analysis import sharpness as sharpness_lib

# Fields ignored when deciding whether two runs are the same setting (they differ only in these).
NOT_SETTING = ("seed",) + config_fields.SAFE_TO_CHANGE


@dataclasses.dataclass
class Run:
  workdir: str
  config: dict
  results: dict[str, float]
  sharpness: float | None

  @property
  def model(self) -> str:
    return self.config["model"]

  @property
  def algo(self) -> str:
    """Table B.1's ALGO: the base optimizer, a non-SAM baseline, or the SAM framework."""
    c, s = self.config, self.config["sam"]
    if s["perturbation"] == "none":
      if c["shrink_perturb"]:
        return "SHRINKPERTURB"
      if c["label_smoothing"]:
        return "LABELSMOOTH"
      return {"adamw": "ADAMW", "sgdw": "SGD"}[c["optimizer"]]
    parts = (["GSAM"] if s["gsam_alpha"] else []) + (["ASAM"] if s["asam"] != "none" else [])
    return "+".join(parts) or "SAM"

  @property
  def perturbation(self) -> str:
    """PERTURB, with OBF's hyperparameters (lambda, gamma, or a fixed alpha)."""
    s = self.config["sam"]
    p = s["perturbation"]
    if p == "obf":
      if s["obf_alpha"] is not None:
        return f"OBF alpha={s['obf_alpha']:g}"
      return f"OBF lambda={s['obf_lambda']:.3g} gamma={s['obf_gamma']:g}"
    return {"none": "NONE", "steepest": "STEEP", "random": "RANDOM"}[p]

  @property
  def m(self) -> int | None:
    return None if self.config["sam"]["perturbation"] == "none" else self.config["sam"]["m"]

  @property
  def test_accuracy(self) -> float:
    """Final top-1 on the first eval set: the accuracy Figure 2 correlates with."""
    return self.results[f"eval/{self.config['eval_datasets'][0]}/top1"]

  @property
  def dataset(self) -> str:
    return self.config["dataset"]

  @property
  def setting(self) -> str:
    return json.dumps(
      {k: v for k, v in workdir_lib.flatten(self.config).items() if k not in NOT_SETTING},
      sort_keys=True,
    )


def dataset_tag(dataset: str, datasets) -> str:
  """' on <dataset>' where runs of several training `datasets` are shown together (a plot label or
  Figure 2 panel must not mix them up), else ''."""
  return f" on {dataset}" if len(set(datasets)) > 1 else ""


def load_run(workdir: str, notes: list[str] | None = None) -> Run:
  """The run in `workdir`; a stale sharpness is not used (a line in `notes`, sharpness.load)."""
  return Run(
    workdir,
    workdir_lib.load_config(workdir).to_dict(),
    workdir_lib.load_results(workdir),
    sharpness_lib.load(workdir, notes),
  )


def load_runs(workdirs: list[str], notes: list[str] | None = None) -> list[Run]:
  """One Run per distinct workdir (a workdir listed twice counts once: a line in `notes`)."""
  seen, runs = {}, []
  for w in workdirs:
    key = w.rstrip("/") if "://" in w else os.path.realpath(w)
    if key in seen:
      if notes is not None:
        notes.append(f"{w}: the same workdir as {seen[key]}: counted once")
      continue
    seen[key] = w
    runs.append(load_run(w, notes))
  return runs


def run_forgetting(run: Run) -> tuple[np.ndarray, np.ndarray]:
  """The run's (forgetting, task-information change) at each adjusted threshold."""
  points = [p for p in collect.load_points(run.workdir) if "cond_p" in p]
  if not points:
    raise ValueError(
      f"{run.workdir}: no collected outputs at theta^p (set "
      "config.analysis.collect_every_steps > 0 on a run with a perturbation)"
    )
  exponents = points[0]["threshold_exponents"]
  return forgetting.run_measures(points, exponents)
