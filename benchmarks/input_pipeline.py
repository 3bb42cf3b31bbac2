"""The tfds input pipeline's throughput against what the train step consumes, on this machine.

  python -m benchmarks.input_pipeline --images 2500 --batch 32 --models vit_s32 resnet50

1. Writes an ImageNet-like dataset, offline, into a temporary data_dir: TFDS `imagenet2012`
   with its real feature spec (JPEG `image`, 1000-class `label`, `file_name`), `--images`
   JPEGs of random sizes 300-500 px with smooth random content (so the files are about the
   size of ImageNet's, unlike white noise, which barely compresses).
2. Times `pf_jax.input_pipeline.train_iterator` on it exactly as training reads ImageNet:
   224 px, Inception crops (decode_and_crop_jpeg), flips, shuffle buffer, batches: images/s.
3. Times the train step of each model at the same batch and 224 px (the base AdamW step and
   the OBF-SAM step with one chunk, via benchmarks.peer), then the same OBF-SAM step fed by the
   pipeline (prefetch_to_device, as in train.py): the pipeline and the step share the CPUs.

Writes results/<device>/input_pipeline_b<batch>.json and .md and prints the table: the ratio
pipeline images/s over step images/s (target >= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np


def write_imagenet_like(data_dir: str, num_images: int, seed: int = 0) -> None:
  """A TFDS `imagenet2012` (same builder, features and version) of synthetic JPEGs."""
  import tensorflow_datasets as tfds
  from PIL import Image

  tfds.disable_progress_bar()
  base = tfds.builder_cls("imagenet2012")

  def examples(n, offset):
    rng = np.random.default_rng(seed + offset)
    for i in range(n):
      h, w = rng.integers(300, 501, size=2)
      # Smooth content: a coarse random grid upsampled, plus mild noise.
      coarse = rng.integers(0, 256, size=(rng.integers(4, 17), rng.integers(4, 17), 3))
      img = Image.fromarray(coarse.astype(np.uint8)).resize(
        (int(w), int(h)), Image.Resampling.BICUBIC
      )
      arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(h, w, 3))
      yield (
        f"{offset + i}",
        {
          "image": np.clip(arr, 0, 255).astype(np.uint8),
          "label": int(rng.integers(0, 1000)),
          "file_name": f"synthetic_{offset + i}.JPEG",
        },
      )

  with tfds.core.registered.skip_registration():

    class Synthetic(base):
      name = "imagenet2012"

      def _split_generators(self, dl_manager):
        return {
          "train": examples(num_images, 0),
          "validation": examples(max(num_images // 10, 1), 10**6),
        }

  Synthetic(data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=data_dir)
  )


def imagenet_batches(data_dir, batch, image_size, shuffle_buffer):
  """`train_iterator` of ImageNet with a run's arguments (`experiment.pipeline_args`, seed 0)."""
  from pf_jax import config_fields
  from pf_jax import experiment
  from pf_jax import input_pipeline

  c = config_fields.defaults()
  c.data_dir, c.image_size, c.shuffle_buffer = data_dir, image_size, shuffle_buffer
  args = experiment.pipeline_args(c, "train", batch)
  return input_pipeline.train_iterator("imagenet2012", **args)


def pipeline_rate(data_dir, batch, image_size, batches, warmup, shuffle_buffer) -> dict:
  """images/s of train_iterator over `batches` batches after `warmup` batches."""
  it = imagenet_batches(data_dir, batch, image_size, shuffle_buffer)
  for _ in range(warmup):
    b = next(it)
  assert b["image"].shape == (batch, image_size, image_size, 3), b["image"].shape
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t0
  return dict(images_per_s=batches * batch / dt, batches=batches, seconds=dt)


def step_rates(model, data_dir, batch, image_size, rounds) -> dict:
  """images/s of the base and OBF-SAM steps on a fixed batch, and of OBF-SAM fed by tf.data."""
  from benchmarks import peer
  from pf_jax import input_pipeline

  jb = peer.JaxBench(model, image_size, batch, 1000, jax.numpy.float32)
  obf = peer.Variant(f"OBF-SAM m={batch}", "obf", batch)
  args = jb.args()
  fns = {
    "base step": peer.compiled(jb.base_step(), args)[0],
    obf.name: peer.compiled(jb.sam_step(obf), args)[0],
  }
  for f in fns.values():
    f()
  timed = peer.interleaved(fns, rounds)
  out = {k: dict(v, images_per_s=batch / v["median_s"]) for k, v in timed.items()}

  # The same OBF-SAM step fed by the pipeline (the host prepares the next batches meanwhile).
  step = jax.jit(jb.sam_step(obf))
  it = input_pipeline.prefetch_to_device(imagenet_batches(data_dir, batch, image_size, 1000), 2)
  params, stats, opt_state, _, k = args
  jax.block_until_ready(step(params, stats, opt_state, next(it), k))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, stats, opt_state, next(it), k))
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  out[f"{obf.name} fed by the pipeline"] = dict(
    median_s=med, samples_s=times, images_per_s=batch / med
  )
  return out


def table(result) -> str:
  p = result["pipeline"]["images_per_s"]
  c = result["config"]
  lines = [
    f"Input pipeline: imagenet2012-like JPEGs ({c['images']} images, 300-500 px), "
    f"{c['image_size']} px Inception crops, batch {c['batch']}: **{p:.1f} images/s** "
    f"({result['machine']['cpu_count']} CPUs)",
    "",
    "| model | step | step images/s | pipeline / step |",
    "|---|---|---|---|",
  ]
  for model, steps in result["steps"].items():
    for name, s in steps.items():
      lines.append(f"| {model} | {name} | {s['images_per_s']:.1f} | {p / s['images_per_s']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--images", type=int, default=2500)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batches", type=int, default=40, help="pipeline batches timed")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--shuffle-buffer", type=int, default=10_000)
  parser.add_argument("--models", nargs="*", default=["vit_s32", "resnet50"])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--data-dir", default=None, help="reuse/keep the dataset here")
  parser.add_argument("--out", default="results")
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or tmp
    t0 = time.perf_counter()
    write_imagenet_like(data_dir, args.images)
    print(f"  dataset ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    pipeline = pipeline_rate(
      data_dir, args.batch, args.image_size, args.batches, args.warmup, args.shuffle_buffer
    )
    print(f"  pipeline: {pipeline['images_per_s']:.1f} images/s", file=sys.stderr)
    steps = {}
    for m in args.models:
      steps[m] = step_rates(m, data_dir, args.batch, args.image_size, args.rounds)
      for name, s in steps[m].items():
        print(f"  {m} {name}: {s['images_per_s']:.1f} images/s", file=sys.stderr)

  from benchmarks import peer

  result = dict(
    config=dict(
      images=args.images,
      batch=args.batch,
      image_size=args.image_size,
      batches=args.batches,
      shuffle_buffer=args.shuffle_buffer,
      rounds=args.rounds,
    ),
    machine=dict(device=peer.device_name(), cpu_count=os.cpu_count(), jax=jax.__version__),
    pipeline=pipeline,
    steps=steps,
  )
  d = os.path.join(args.out, result["machine"]["device"])
  os.makedirs(d, exist_ok=True)
  stem = os.path.join(d, f"input_pipeline_b{args.batch}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(table(result))
  print(table(result))
  print(f"wrote {stem}.json and {stem}.md")
  return result


if __name__ == "__main__":
  main()
