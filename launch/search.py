"""In-process runs and the validation search, shared by reproduce.py, powered.py and science.py.

`Runner` trains configs/reproduce.py runs in this process (the seeds of a config share its
compiled programs), skipping finished ones. `search` runs a launcher's SEARCH stages on a
benchmark's validation carve-out, each stage on top of the earlier winners; `save_search` writes
ROOT/search.json and ROOT/search.md. Importing this module imports neither jax nor pf_jax.
"""

import itertools
import json
import os
import sys
import time

from launch.common import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, "configs", "reproduce.py")
# Which search stages' winners each method takes (every method takes the learning rate).
USES = {
  "adamw": ("lr",),
  "sam_steep": ("lr", "steep"),
  "sam_obf": ("lr", "obf"),
  "gsam_steep": ("lr", "steep"),
  "gsam_obf": ("lr", "obf"),
  "asam_steep": ("lr", "asam"),
  "asam_obf": ("lr", "asam", "obf_shape"),  # ASAM's radius, OBF's lambda and gamma
  "random_sam": ("lr", "steep"),
  "label_smoothing": ("lr",),
  "shrink_perturb": ("lr",),
}


class Runner:
  """Trains runs in this process, skipping finished ones, and records their wall times."""

  def __init__(self, root: str, overrides: list[tuple[str, str]]):
    import jax  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top

    from pf_jax import process  # pylint: disable=g-import-not-at-top

    # One line per run from here (below); compiled programs that recur (evaluation, the
    # sharpness' Hessian-vector product) are read from a persistent cache.
    logging.set_verbosity(logging.WARNING)
    process.skip_absent_tpu()  # no libtpu probing on a machine without a TPU (main.py's)
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    with process.quiet_native_stderr():
      from pf_jax import checkpointing  # pylint: disable=g-import-not-at-top
      from pf_jax import cli  # pylint: disable=g-import-not-at-top
      from pf_jax import config_validation  # pylint: disable=g-import-not-at-top
      from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top
      from pf_jax import train  # pylint: disable=g-import-not-at-top
      from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
      from pf_jax.analysis import sharpness  # pylint: disable=g-import-not-at-top
    input_pipeline.tfds.disable_progress_bar()
    self.cli, self.train, self.workdir_lib, self.sharpness = cli, train, workdir_lib, sharpness
    self.checkpointing = checkpointing
    self.validate = lambda c: config_validation.validate(c, jax.device_count(), jax.process_count())
    self.root = root
    self.overrides = overrides
    self.timings_path = os.path.join(root, "timings.json")
    self.cache = {}  # programs shared by the seeds of a config, batches by the methods of a seed
    self.timings = {}
    if os.path.exists(self.timings_path):
      with open(self.timings_path) as f:
        self.timings = json.load(f)

  def train_run(self, workdir: str, arg: str, fields: dict) -> dict[str, float]:
    """Final eval metrics of configs/reproduce.py:ARG with `fields` and the global overrides."""
    if not os.path.exists(os.path.join(workdir, "results.json")):
      overrides = [(k, repr(v)) for k, v in fields.items()] + self.overrides
      config = self.cli.build_config(f"{CONFIG}:{arg}", overrides)
      self.validate(config)  # the boundary: train_and_evaluate takes a valid config
      start, cpu = time.time(), os.times()
      try:
        self.train.train_and_evaluate(config, workdir, cache=self.cache)
      except self.checkpointing.Preempted as e:  # SIGTERM/SIGINT: the run's step is saved
        print(f"{os.path.relpath(workdir, self.root)}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(self.checkpointing.PREEMPTED_EXIT_CODE) from None
      self.record(workdir, "train", time.time() - start)
      now = os.times()  # this process's CPU seconds (on a shared machine, less than 2 x wall)
      self.record(workdir, "train_cpu", now.user + now.system - cpu.user - cpu.system)
      results = self.workdir_lib.load_results(workdir)
      print(
        f"{os.path.relpath(workdir, self.root)}: {time.time() - start:.0f} s, "
        + " ".join(f"{k}={v:.4f}" for k, v in sorted(results.items()) if k.startswith("eval/")),
        flush=True,
      )
    return self.workdir_lib.load_results(workdir)

  def val_top1(self, benchmark: str, name: str, method: str, fields: dict) -> float:
    """Validation top-1 of the search run ROOT/search/BENCHMARK/NAME (BENCHMARK_val,METHOD)."""
    workdir = os.path.join(self.root, "search", benchmark, name)
    results = self.train_run(workdir, f"{benchmark}_val,{method}", fields)
    return results[f"eval/{val_dataset(benchmark)}/top1"]

  def sharpness_of(self, workdir: str) -> None:
    if self.sharpness.load(workdir) is None:
      start = time.time()
      value = self.sharpness.checkpoint_sharpness(workdir)["sharpness"]
      self.record(workdir, "sharpness", time.time() - start)
      rel = os.path.relpath(workdir, self.root)
      print(f"{rel}: sharpness {value:.4g} ({time.time() - start:.0f} s)", flush=True)

  def record(self, workdir, what, seconds):
    """Adds a wall time (seconds) to ROOT/timings.json."""
    self.timings.setdefault(os.path.relpath(workdir, self.root), {})[what] = round(seconds, 1)
    with open(self.timings_path, "w") as f:
      json.dump(self.timings, f, indent=1, sort_keys=True)

  def record_invocation(self, start: float) -> float:
    """This invocation's wall seconds since `start`, also recorded in ROOT/timings.json."""
    total = time.time() - start
    self.record(self.root, f"invocation {time.strftime('%Y-%m-%d %H:%M:%S')}", total)
    return total


def val_dataset(benchmark: str) -> str:
  return {"digits": "digits_val", "spurious": "spurious_digits_val"}[benchmark]


def grid_points(grid: dict, max_values: int) -> list[dict]:
  """Every combination of the grid (each axis cut to its first `max_values`), as field dicts."""
  axes = [
    [dict(zip(k, v)) if isinstance(k, tuple) else {k: v} for v in values[:max_values]]
    for k, values in grid.items()
  ]
  return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*axes)]


def winners_for(method: str, winners: dict) -> dict:
  """The searched field values `method` trains with."""
  out = {}
  for stage in USES[method]:
    if stage == "obf_shape":
      out.update({k: v for k, v in winners.get("obf", {}).items() if k != "sam.rho_max"})
    else:
      out.update(winners.get(stage, {}))
  return out


def stages_needed(methods) -> set:
  """The search stages whose winners `methods` train with."""
  needed = {s for m in methods for s in USES[m]}
  return needed | ({"obf"} if "obf_shape" in needed else set())


def _next(values, value):
  """The value one step beyond `value` at an edge of sorted numeric `values` (same ratio as the
  last step), or None when `value` is inside or the axis has fewer than two values."""
  v = sorted(values)
  if len(v) < 2 or v[0] <= 0:
    return None
  if value == v[-1]:
    return float(f"{v[-1] * v[-1] / v[-2]:.3g}")
  if value == v[0]:
    return float(f"{v[0] * v[0] / v[1]:.3g}")
  return None


def search_stage(grid: dict, score, max_values: int = 100, max_extend: int = 0):
  """The grid's points, their scores, extension past edge winners, and the winner.

  Args:
    grid: {field or tuple of fields: values}; tuple axes are categorical (never extended).
    score: point (a field dict) -> validation score (higher is better).
    max_values: each axis cut to its first N values.
    max_extend: most points added beyond an edge.
  Returns:
    ([(point, score)] in scoring order, winner point). Ties go to the earlier point.
  """
  points = grid_points(grid, max_values)
  scored = [(p, score(p)) for p in points]
  axes = {k: list(v[:max_values]) for k, v in grid.items() if not isinstance(k, tuple)}

  def best():  # highest score; ties go to the earlier point
    return scored[max(range(len(scored)), key=lambda i: (scored[i][1], -i))][0]

  for _ in range(max_extend):
    winner = best()
    for field, values in axes.items():
      beyond = _next(values, winner[field])
      if beyond is not None:
        values.append(beyond)
        point = {**winner, field: beyond}
        scored.append((point, score(point)))
        break
    else:
      break
  return scored, best()


def search(stages, needed: set, score, max_values: int, max_extend: int = 0, with_grid=False):
  """Runs the `stages` (stage, method, grid) named in `needed`, in order, each with the earlier
  winners fixed; returns {stage: {method, fixed, [grid,] scores, winner}}.

  score(stage, method, fixed, k, point) -> (validation top-1, more keys of the point's entry in
  `scores`); k counts the stage's points from 0.
  """
  winners, record = {}, {}
  for stage, method, grid in stages:
    if stage not in needed:
      continue
    fixed = winners_for(method, winners)
    extras = []

    def score_point(point, stage=stage, method=method, fixed=fixed, extras=extras):
      value, extra = score(stage, method, fixed, len(extras), point)
      extras.append(extra)
      return value

    scored, winner = search_stage(grid, score_point, max_values, max_extend)
    winners[stage] = winner
    record[stage] = {"method": method, "fixed": fixed}
    if with_grid:
      record[stage]["grid"] = {
        " ".join(k) if isinstance(k, tuple) else k: v for k, v in grid.items()
      }
    record[stage]["scores"] = [
      {"point": p, "val_top1": a, **e} for (p, a), e in zip(scored, extras)
    ]
    record[stage]["winner"] = winner
  return record


def search_markdown(searches: dict, title: str, each: bool = False) -> str:
  """One table per benchmark: every scored point, its accuracy (`each`: also per seed), the
  winner."""
  lines = [f"# {title}", ""]
  for benchmark, record in searches.items():
    lines += [
      f"## {benchmark}",
      "",
      f"| stage | method | point | val top-1 (%) |{' per seed |' if each else ''} |",
      "|---|---|---|---|---|" + ("---|" if each else ""),
    ]
    for stage, r in record.items():
      for s in r["scores"]:
        point = ", ".join(f"{k}={v:g}" for k, v in s["point"].items())
        cells = [stage, r["method"], point, f"{100 * s['val_top1']:.2f}"]
        if each:
          cells.append(" / ".join(f"{100 * a:.2f}" for a in s["per_seed"]))
        cells.append("**winner**" if s["point"] == r["winner"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def save_search(root: str, searches: dict, title: str, start: float, each: bool = False) -> None:
  """ROOT/search.json and ROOT/search.md (search_markdown's), and a line saying so."""
  with open(os.path.join(root, "search.json"), "w") as f:
    json.dump(searches, f, indent=1)
  with open(os.path.join(root, "search.md"), "w") as f:
    f.write(search_markdown(searches, title, each))
  print(f"search done ({time.time() - start:.0f} s so far); see {root}/search.md", flush=True)
