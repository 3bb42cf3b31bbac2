"""The peer benchmark's machinery (benchmarks/peer.py) on a tiny model, one round."""

import json
import os

import pytest

from benchmarks import peer


@pytest.mark.slow
def test_peer_benchmark_writes_json_and_table_with_its_own_floor(tmp_path, capsys):
  result = peer.main(
    [
      "--model=vit_digits",
      "--image=8",
      "--batch=8",
      "--m=4",
      "--num-classes=10",
      "--rounds=1",
      "--chunk-modes=vmap",
      "--only=^SAM m=8$",
      "--no-torch",
      "--no-optax",
      f"--out={tmp_path}",
    ]
  )
  stem = tmp_path / result["machine"]["device"] / "vit_digits_8px_b8_m4_float32"
  with open(f"{stem}.json") as f:
    saved = json.load(f)
  assert set(saved["pf_jax"]) == {"fwd+bwd", "update", "base step", "SAM m=8"}
  t = {k: v["median_s"] for k, v in saved["pf_jax"].items()}
  assert saved["floor_s"] == pytest.approx(2 * t["fwd+bwd"] + t["update"])
  assert all(len(v["samples_s"]) == 1 for v in saved["pf_jax"].values())
  assert saved["memory"]["SAM m=8"]["temp_size_in_bytes"] >= 0
  assert saved["config"]["m"] == [4] and saved["torch"] == {}
  text = open(f"{stem}.md").read()
  assert text == peer.report(saved) and text in capsys.readouterr().out
  rows = [line for line in peer.table(saved).splitlines() if line.startswith("| SAM m=8 |")]
  assert len(rows) == 2  # the timing table, then the memory table
  ratio = float(rows[0].split("|")[3])
  assert ratio == pytest.approx(t["SAM m=8"] / saved["floor_s"], abs=0.006)
  assert os.path.exists(f"{stem}.md")


def test_imagenet_like_dataset_feeds_the_real_pipeline(tmp_path):
  """The input-pipeline benchmark's generated imagenet2012 is read by train_iterator at 224 px."""
  from benchmarks import input_pipeline as bench

  bench.write_imagenet_like(str(tmp_path), 8)
  rate = bench.pipeline_rate(
    str(tmp_path), batch=4, image_size=224, batches=2, warmup=1, shuffle_buffer=8
  )
  assert rate["batches"] == 2 and rate["images_per_s"] > 0


def test_vit_layer_formulations_agree_and_are_timed():
  """benchmarks/vit_layers.py: every formulation's output matches flax's own layer (checked
  inside), and each is timed once."""
  from benchmarks import vit_layers

  out = vit_layers.main(["--batch=2", "--image=64", "--rounds=1"])
  assert {k: len(v) for k, v in out.items()} == {"patch embedding": 2, "attention block": 3}
  assert all(t > 0 for group in out.values() for t in group.values())
