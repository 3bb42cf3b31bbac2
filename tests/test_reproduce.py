"""launch/reproduce.py: its search grid and, reduced, the whole reproduction end to end."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from launch import reproduce
from launch import search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_points_and_winners():
  grid = {"a": (1, 2, 3), ("b", "c"): ((0.1, 1.0), (0.3, 0.5))}
  points = search.grid_points(grid, 100)
  assert len(points) == 6
  assert points[0] == {"a": 1, "b": 0.1, "c": 1.0} and points[-1] == {"a": 3, "b": 0.3, "c": 0.5}
  assert search.grid_points(grid, 1) == [{"a": 1, "b": 0.1, "c": 1.0}]
  winners = {
    "lr": {"lr_max": 0.01},
    "obf": {"sam.rho_max": 0.3, "sam.obf_lambda": 0.3, "sam.obf_gamma": 0.5},
    "asam": {"sam.rho_max": 3.0},
  }
  # ASAM-OBF: ASAM's radius, OBF's lambda and gamma; every method: the learning rate.
  assert search.winners_for("asam_obf", winners) == {
    "lr_max": 0.01,
    "sam.rho_max": 3.0,
    "sam.obf_lambda": 0.3,
    "sam.obf_gamma": 0.5,
  }
  assert search.winners_for("label_smoothing", winners) == {"lr_max": 0.01}
  assert set(reproduce.METHODS) == set(search.USES)


@pytest.mark.slow
def test_reproduction_end_to_end_reduced(tmp_path):
  """1 seed, 2 methods, spurious digits, 3 steps: search, runs, sharpness, table, plots; a rerun
  trains nothing."""
  root = str(tmp_path / "repro")
  cmd = [
    sys.executable,
    "launch/reproduce.py",
    f"--root={root}",
    "--benchmarks=spurious",
    "--methods=adamw,sam_obf",
    "--seeds=0",
    "--max_grid=1",
  ] + [
    f"--override={o}"
    for o in (
      "num_train_steps=3",
      "warmup_steps=1",
      "eval_every_steps=2",
      "analysis.sharpness_iters=3",
      "analysis.sharpness_examples=256",
      f"data_dir={tmp_path / 'data'}",
    )
  ]
  flags = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f
  )  # one CPU device, as a user runs it
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=flags)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
  assert out.count("search/spurious/") == 2  # the lr and obf stages, one point each
  search = json.load(open(os.path.join(root, "search.json")))["spurious"]
  assert set(search) == {"lr", "obf"}
  assert search["lr"]["winner"] == {"lr_max": 1e-3}
  # The runs train with the winners; each has results on ID and OOD, and a sharpness.
  expected = {}
  for method in ("adamw", "sam_obf"):
    workdir = os.path.join(root, "runs", "spurious", f"{method}-s0")
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["lr_max"] == 1e-3 and config["sam"]["rho_max"] in (0.0, 0.03)
    results = json.load(open(os.path.join(workdir, "results.json")))
    # (3 steps from init: the dominant eigenvalue may still be negative)
    assert math.isfinite(json.load(open(os.path.join(workdir, "sharpness.json")))["sharpness"])
    expected[method] = results
  analysis = os.path.join(root, "analysis", "spurious")
  rows = list(csv.DictReader(open(os.path.join(analysis, "results.csv"))))
  assert len(rows) == 2
  by_algo = {r["algo"]: r for r in rows}
  for algo, method in (("ADAMW", "adamw"), ("SAM", "sam_obf")):
    for ds in ("spurious_digits", "spurious_digits_ood"):
      want = 100 * expected[method][f"eval/{ds}/top1"]
      assert float(by_algo[algo][f"eval/{ds}/top1/mean"]) == pytest.approx(want, abs=1e-3)
  table = open(os.path.join(analysis, "results.md")).read()
  assert "| SPURIOUS_DIGITS | SPURIOUS_DIGITS_OOD |" in table
  for png in ("accuracy.png", "curves.png"):
    assert os.path.getsize(os.path.join(analysis, png)) > 10_000
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
  assert "search/" not in again and "runs/" not in again  # restartable: nothing retrained
