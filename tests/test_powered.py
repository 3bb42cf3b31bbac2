"""launch/powered.py: seeds from power, the fair search's edge extension, the plan, end to end."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from launch import common
from launch import powered
from launch import search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seeds_follow_from_power():
  # Normal approximation by hand: ((1.96 + 0.8416) * 1.47 / 1)^2 = 16.96 -> 17; the t-test needs
  # a few more (19), below the floor of 20. OOD: ((2.8016 * 4.26 / 2)^2 = 35.6 -> 36; t: 38.
  assert powered.seeds_needed("digits") == 20
  assert powered.seeds_needed("spurious") == 38
  assert powered.MIN_SEEDS == 20


def test_search_grids_are_fair():
  sizes = {st: len(search.grid_points(g, 100)) for st, _, g in powered.SEARCH}
  assert sizes["steep"] == sizes["obf"]
  assert len(powered.SEARCH_SEEDS) >= 3


@pytest.mark.parametrize("benchmark", ["digits", "spurious"])
def test_search_reads_only_the_validation_carve_out(benchmark):
  from configs import reproduce
  from pf_jax import dataset_catalog

  for _, method, _ in powered.SEARCH:
    c = reproduce.get_config(f"{benchmark}_val,{method}")
    assert c.dataset.endswith("_val") and tuple(c.eval_datasets) == (c.dataset,)
    spec = dataset_catalog.DATASETS[c.dataset]
    assert spec.train_split == "train[:1150]" and spec.eval_splits == ("train[1150:]",)


@pytest.mark.parametrize(
  "peak, want_points, want_winner",
  [
    (16.0, [1, 2, 4, 8, 16], 16),  # upper edge wins twice: two steps beyond (MAX_EXTEND = 2)
    (6.0, [1, 2, 4, 8, 16], 8),  # 8 wins on the new edge, 16 is tried and loses
    (2.0, [1, 2, 4], 2),  # inside: no extension
    (0.25, [1, 2, 4, 0.5, 0.25], 0.25),  # lower edge: steps of the same ratio downwards
  ],
)
def test_edge_winner_extends_the_grid(peak, want_points, want_winner):
  calls = []

  def score(point):
    calls.append(point["a"])
    return -abs(np.log(point["a"] / peak))

  scored, winner = search.search_stage({"a": (1.0, 2.0, 4.0)}, score, max_extend=2)
  assert [p["a"] for p, _ in scored] == want_points == calls
  assert winner == {"a": want_winner}


def test_categorical_axis_is_not_extended_and_ties_go_first():
  grid = {"a": (1.0, 3.0), ("b", "c"): ((0.1, 1.0), (0.3, 0.5))}
  scored, winner = search.search_stage(grid, lambda p: p["a"] + p["b"], max_extend=1)
  assert len(scored) == 5
  assert scored[-1][0] == {"a": 9.0, "b": 0.3, "c": 0.5}  # only `a` moved, the pair kept
  assert winner == scored[-1][0]
  assert len(search.search_stage({"a": (1.0, 2.0, 3.0)}, lambda p: 0.0)[0]) == 3  # not extended
  scored, winner = search.search_stage({"a": (1.0, 2.0, 3.0)}, lambda p: 0.0, max_extend=2)
  assert winner == {"a": 1.0}  # a tie everywhere: the first point, on the lower edge: adds 1/2
  assert [p["a"] for p, _ in scored] == [1.0, 2.0, 3.0, 0.5]


def test_plan_and_seed_ranges():
  assert common.seed_range("0-2,7") == [0, 1, 2, 7]
  methods = ["sam_steep", "adamw"]
  full = powered.plan(["spurious"], methods, None)["spurious"]
  assert sum(m == "sam_steep" for m, _ in full) == 38
  assert sum(m == "adamw" for m, _ in full) == 20  # references: MIN_SEEDS
  late = powered.plan(["digits", "spurious"], methods, common.seed_range("20-45"))
  assert late["digits"] == [] and len(late["spurious"]) == 18


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.parametrize(
  "base, other, label, stages",
  [
    pytest.param(  # the lr stage only
      "adamw", "label_smoothing", "label smoothing − AdamW", 1, marks=pytest.mark.long
    ),
    pytest.param("sam_steep", "sam_obf", "SAM: OBF − STEEP", 3, marks=pytest.mark.slow),
  ],
)
def test_powered_end_to_end_reduced(tmp_path, base, other, label, stages):
  """2 seeds x 2 methods, spurious digits, 3 steps: search (one point per stage, two seeds),
  runs, paired table; a rerun after a run was deleted searches nothing and trains that run again,
  alone, with the same numbers (the first time it reused seed 0's programs, now it compiles its own)."""
  root = str(tmp_path / "powered")
  cmd = [
    sys.executable,
    "launch/powered.py",
    f"--root={root}",
    "--benchmarks=spurious",
    f"--methods={base},{other}",
    "--seeds=0-1",
    "--search_seeds=0,1",
    "--max_grid=1",
  ] + [
    f"--override={o}"
    for o in ("num_train_steps=3", "warmup_steps=1", f"data_dir={tmp_path / 'data'}")
  ]
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=flags)
  run = lambda: subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
  out = run().stdout
  assert "spurious: 38 paired seeds" in out and "estimated" in out
  assert out.count("search/spurious/") == 2 * stages  # one point, two seeds per stage
  path = lambda m, s: os.path.join(root, "runs", "spurious", f"{m}-s{s}", "results.json")
  results = {(m, s): json.load(open(path(m, s))) for m in (base, other) for s in (0, 1)}
  diffs = {}
  for metric in ("spurious_digits", "spurious_digits_ood", "spurious_digits_ood_all"):
    acc = {k: r[f"eval/{metric}/top1"] for k, r in results.items()}
    diffs[metric] = [100 * (acc[other, s] - acc[base, s]) for s in (0, 1)]
  record = json.load(open(os.path.join(root, "analysis", "paired.json")))["spurious"]
  rows = {r["metric"]: r["summary"] for r in record["rows"] if r["comparison"] == label}
  for metric, d in diffs.items():
    s = rows[f"eval/{metric}/top1"]
    assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(d), abs=1e-9)
    if np.std(d) > 0:
      assert s["p_t"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
  text = open(os.path.join(root, "analysis", "paired.md")).read()
  assert "**PENDING**" in text and f"| {label} | spurious_digits_ood_all | 2 |" in text
  assert os.path.getsize(os.path.join(root, "analysis", "paired.png")) > 5_000
  # Restartable: with one run deleted, a rerun searches nothing and trains that run alone.
  shutil.rmtree(os.path.dirname(path(other, 1)))
  again = run().stdout
  assert "search/" not in again and again.count("runs/") == 1
  assert json.load(open(path(other, 1))) == results[other, 1]
