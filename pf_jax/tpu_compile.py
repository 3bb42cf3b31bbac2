"""Compile a run's programs for a TPU slice on a machine without one (`main.py --compile_for`).

With `libtpu` installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies` gives
compile-only devices of a TPU slice on any machine. The run's own programs (`train._train_program`,
`train.make_eval_step`, `train.make_collect_step`) are lowered for them with `ShapeDtypeStruct`s at
the config's real global batch (no data is read and no parameter is materialized: the state is
`jax.eval_shape(Experiment.init_state)`) and compiled. XLA then reports each program's memory
per device (its buffer assignment for that TPU) and its FLOPs per device (`cost_analysis`).

What the figures are: memory is XLA's buffer assignment, FLOPs are XLA's count of the compiled
program, and the time is a lower bound, FLOPs / peak; nothing is measured on a TPU. XLA's own
`optimal_seconds` estimate is not used: it came out negative for real programs here.

Devices versus chips, found by listing the compile-only devices of each generation:
  - v2, v3: one device per TensorCore, 2 per chip, each core with its own half of the chip's HBM;
    slice names count cores (v3-32: 16 chips, 32 devices).
  - v4, v5p: one device per chip (megacore: the chip's 2 TensorCores act as one device, as on a
    real v4 VM; the compile-only default would be one device per core); slice names count cores
    (v4-8: 4 chips).
  - v5e (v5litepod), v6e: one TensorCore per chip, one device per chip; names count chips.
So the figures are per device, which is per chip except on v2/v3 (per core, against its half of
the HBM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable

import ml_collections

GIB = 2**30

# Per chip: HBM in GiB and peak bfloat16 matmul TFLOP/s, from Google Cloud's TPU pages
# (cloud.google.com/tpu/docs/v2, /v3, /v4, /v5e, /v5p, /v6e: "System architecture"/"specifications"
# tables; read 2026-12). Float32: JAX's default matmul precision on TPU computes a float32 matmul
# in one bfloat16 pass (jax.default_matmul_precision), so its peak is the same; no float32 peak
# is published, and a lower bound stays a lower bound.
CHIPS = {
  "v2": dict(hbm_gib=16, peak_tflops=45, cores=2),
  "v3": dict(hbm_gib=32, peak_tflops=123, cores=2),
  "v4": dict(hbm_gib=32, peak_tflops=275, cores=2),
  "v5e": dict(hbm_gib=16, peak_tflops=197, cores=1),
  "v5p": dict(hbm_gib=95, peak_tflops=459, cores=2),
  "v6e": dict(hbm_gib=32, peak_tflops=918, cores=1),
}
# Chips per host of multi-host slices (Cloud TPU VM hosts: 4 chips; v5e/v6e slices of up to 8
# chips are one host).
CHIPS_PER_HOST = 4
# Chip grids by chip count (the topologies Cloud TPU offers; 3-D for v4/v5p).
GRID_3D = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
}
GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16)}
GRID_2D[256] = (16, 16)

SLICE_HELP = (
  "a TPU slice as Cloud TPU names it: v2-8, v3-32, v4-8, v5p-16, v5litepod-16 (or v5e-16), v6e-8"
)


class CompileForError(ValueError):
  """A bad --compile_for value, or libtpu missing: one line."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice and its compile-only topology.

  Attributes:
    name: as given, e.g. "v4-8".
    generation: key of `CHIPS`.
    chips: chips in the slice.
    devices: JAX devices (chips, or cores on v2/v3).
    hosts: TPU VM hosts (processes).
    topology: `get_topology_desc` topology name, e.g. "v4:2x2x1".
    options: its other arguments (chip config, chips per host).
  """

  name: str
  generation: str
  chips: int
  devices: int
  hosts: int
  topology: str
  options: dict

  @property
  def per_device(self) -> str:
    return "core" if self.generation in ("v2", "v3") else "chip"

  @property
  def hbm_gib(self) -> float:
    """HBM of one device (v2/v3: a core's half of the chip's)."""
    return CHIPS[self.generation]["hbm_gib"] / (self.devices // self.chips)

  @property
  def peak_flops(self) -> float:
    """Peak FLOP/s of one device."""
    return CHIPS[self.generation]["peak_tflops"] * 1e12 / (self.devices // self.chips)


def parse_slice(name: str) -> Slice:
  """ "v4-8" -> its `Slice`; CompileForError for a name that is no Cloud TPU slice."""
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if not m:
    raise CompileForError(f"--compile_for: {name!r} is not a TPU slice; expected {SLICE_HELP}")
  gen, n = m.group(1), int(m.group(2))
  gen = "v5e" if gen == "v5litepod" else gen
  cores = CHIPS[gen]["cores"]
  if gen in ("v2", "v3"):  # names count cores; one device per core; 8 cores per host
    chips, devices = n // 2, n
    grid = GRID_2D.get(chips)
    options = {}
  elif gen in ("v4", "v5p"):  # names count cores; megacore: one device per chip
    chips = devices = n // cores
    grid = GRID_3D.get(chips)
    options = {"chip_config_name": "megacore", "chips_per_host_bounds": (2, 2, 1)}
  else:  # v5e, v6e: names count chips
    chips = devices = n
    grid = GRID_2D.get(chips)
    host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
    options = {"chips_per_host_bounds": host}
  if grid is None or n % cores:
    sizes = sorted(GRID_3D if gen in ("v4", "v5p") else GRID_2D)
    allowed = ", ".join(f"{gen}-{s * cores if gen != 'v5e' and gen != 'v6e' else s}" for s in sizes)
    raise CompileForError(f"--compile_for: {name!r}: unknown {gen} slice size; known: {allowed}")
  hosts = 1 if gen in ("v5e", "v6e") and chips <= 8 else max(1, chips // CHIPS_PER_HOST)
  topology = f"{gen}:{'x'.join(map(str, grid))}"
  return Slice(name, gen, chips, devices, hosts, topology, options)


def topology_devices(tpu_slice: Slice) -> list:
  """The slice's compile-only devices; CompileForError without libtpu."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise CompileForError(
      '--compile_for needs libtpu: pip install -e ".[tpu]" (or "jax[tpu]"), then run it again'
    ) from None
  # Compile-only: no chip is opened, so another process holding libtpu's lock (a run on this TPU
  # VM, a second check) does not matter, and there is no metadata server to ask.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  topo = topologies.get_topology_desc(
    topology_name=tpu_slice.topology, platform="tpu", **tpu_slice.options
  )
  devices = list(topo.devices)
  if (
    len(devices) != tpu_slice.devices or len({d.process_index for d in devices}) != tpu_slice.hosts
  ):
    raise CompileForError(
      f"--compile_for: {tpu_slice.name}: libtpu's topology {tpu_slice.topology} has {len(devices)} devices on "
      f"{len({d.process_index for d in devices})} hosts, expected {tpu_slice.devices} on {tpu_slice.hosts}"
    )
  return devices


@dataclasses.dataclass
class Report:
  """One compiled program's figures (per device)."""

  program: str
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  flops: float
  compile_seconds: float
  calls: int | None = None  # how often a run calls it (train: its steps), None: not counted
  refused: str | None = None  # XLA's own "ran out of memory" (then only total_bytes is known)
  needed_bytes: int = 0  # with `refused`: the memory XLA said it needs
  matmul_flops: float = 0.0  # `matmul_flops` of the traced program (loops counted fully)
  same_as: str | None = None  # another dataset's eval step: the same program, not compiled again
  note: str | None = None  # what one call is, where the program name does not say it

  @property
  def step_flops(self) -> float:
    """The larger of XLA's count and the matmuls' (XLA counts a loop body once)."""
    return max(self.flops, self.matmul_flops)

  @property
  def total_bytes(self) -> int:
    """What the program holds at its peak: arguments, temporaries and outputs, less the outputs
    that reuse donated arguments (or what XLA said it needs, when it refused)."""
    if self.refused:
      return self.needed_bytes
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  def fits(self, tpu_slice: Slice) -> bool:
    return not self.refused and self.total_bytes <= tpu_slice.hbm_gib * GIB

  def bound_ms(self, tpu_slice: Slice) -> float:
    return 1e3 * self.step_flops / tpu_slice.peak_flops


def matmul_flops(jaxpr, while_trips: int = 1) -> float:
  """FLOPs of the matmuls and convolutions of a (closed) jaxpr, loops counted as often as they run.

  XLA's `cost_analysis` counts the body of a loop once, so a step that scans its m-chunks or its
  micro-batches is under-counted there; this count multiplies each `scan` body by its length,
  and a `while` body by `while_trips` (its trip count is not in the program: the sharpness power
  iteration runs at most `analysis.sharpness_iters` times).
  A [a, b] x [b, c] matmul is 2abc; a convolution 2 x outputs x kernel window x input features.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (_, rc), (_, rb) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
      total += 2.0 * float(np.prod(lhs)) * float(np.prod(free))
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *window)
      window = float(np.prod([rhs[i] for i in spec[2:]]))
      total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * window * rhs[spec[1]]
    subs = [
      v
      for v in eqn.params.values()
      for v in (v if isinstance(v, (tuple, list)) else (v,))
      if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")
    ]
    if name == "cond":
      total += max((matmul_flops(b, while_trips) for b in subs), default=0.0)
    else:
      times = {"scan": eqn.params.get("length", 1), "while": while_trips}.get(name, 1)
      total += times * sum(matmul_flops(b, while_trips) for b in subs)
  return total


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT])\b")


def _needed_bytes(message: str) -> int:
  """The first size in XLA's out-of-memory message ("... required for HLO temporaries (48.00G)
  exceeds available HBM (15.75G)", "Used 20.5G of 15.48G hbm"): what the program needs."""
  m = _SIZE.search(message)
  if not m:
    return 0
  return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _measure(name: str, jitted, args, calls=None, while_trips: int = 1) -> Report:
  import jax  # pylint: disable=g-import-not-at-top

  start = time.time()
  traced = jitted.trace(*args)
  matmuls = matmul_flops(traced.jaxpr, while_trips)
  try:
    compiled = traced.lower().compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what exceeds the HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    seconds = time.time() - start
    needed = _needed_bytes(message)
    return Report(name, 0, 0, 0, 0, 0.0, seconds, calls, message, needed, matmuls)
  seconds = time.time() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return Report(
    name,
    int(mem.argument_size_in_bytes),
    int(mem.temp_size_in_bytes),
    int(mem.output_size_in_bytes),
    int(mem.alias_size_in_bytes),
    float(cost.get("flops", 0.0)),
    seconds,
    calls,
    matmul_flops=matmuls,
  )


def build_experiment(config: ml_collections.ConfigDict, tpu_slice: Slice):
  """The run of `config` on the slice, with the dataset facts of the catalog (no data read)."""
  from pf_jax import dataset_catalog  # pylint: disable=g-import-not-at-top
  from pf_jax import experiment  # pylint: disable=g-import-not-at-top

  spec = dataset_catalog.DATASETS[config.dataset]
  return experiment.build(
    config,
    num_classes=spec.num_classes,
    num_train_examples=spec.train_examples,
    num_devices=tpu_slice.devices,
    num_processes=tpu_slice.hosts,
  )


def compile_programs(
  config: ml_collections.ConfigDict,
  tpu_slice: Slice,
  devices: list,
  programs: tuple[str, ...] = ("train", "eval", "collect", "sharpness"),
  log: Callable[[str], None] | None = None,
) -> list[Report]:
  """Compiles the run's programs for `devices` (a `topology_devices(s)`) and measures them.

  Args:
    c: a validated config (for `s.devices` devices on `s.hosts` processes).
    s: the slice.
    devices: its compile-only devices.
    programs: which ones: "train"; "eval" (one per evaluation dataset); "collect" (only where
      `analysis.collect_every_steps` is set); "sharpness" (`python -m pf_jax.analysis sharpness`,
      which every config's `analysis.sharpness_*` fields set up: `sharpness_program`).
    log: receives each program's name before it compiles.

  Returns:
    One `Report` per compiled program.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from pf_jax import dataset_catalog  # pylint: disable=g-import-not-at-top
  from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from pf_jax import train  # pylint: disable=g-import-not-at-top

  log = log or (lambda line: None)
  exp = build_experiment(config, tpu_slice)
  mesh = Mesh(np.asarray(devices), (train.AXIS,))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(train.AXIS))
  sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  state = jax.tree.map(lambda x: sds(x.shape, x.dtype, rep), jax.eval_shape(exp.init_state))

  def images(n, size):
    return sds((n, size, size, 3), jnp.float32, data)

  reports = []
  if "train" in programs:
    log("train")
    batch = {
      "image": images(config.global_batch_size, config.image_size),
      "label": sds((config.global_batch_size,), jnp.int32, data),
    }
    key = sds((2,), jnp.uint32, rep)
    program = train._train_program(exp, mesh)  # pylint: disable=protected-access
    reports.append(_measure("train", program, (state, batch, key), exp.total_steps))
  if "eval" in programs:
    same = {}  # datasets with the same batch and logits compile to the same program
    for name in config.eval_datasets:
      spec = dataset_catalog.DATASETS[name]
      subset = input_pipeline.class_subset(name)
      key = (spec.real_label_key is not None, None if subset is None else tuple(subset))
      if key in same:
        reports.append(
          dataclasses.replace(same[key], program=f"eval/{name}", same_as=same[key].program)
        )
        continue
      log(f"eval/{name}")
      n = config.eval_batch_size
      batch = {
        "image": images(n, exp.eval_image_size),
        "label": sds((n,), jnp.int32, data),
        "mask": sds((n,), jnp.float32, data),
      }
      if spec.real_label_key is not None:
        batch["real_label"] = sds((n, spec.num_classes), jnp.float32, data)
        batch["real_valid"] = sds((n,), jnp.float32, data)
      step = train.make_eval_step(exp, mesh, subset)
      totals = jax.eval_shape(step, state.params, state.batch_stats, {}, batch)
      totals = jax.tree.map(lambda x: sds(x.shape, x.dtype, rep), totals)
      same[key] = _measure(f"eval/{name}", step, (state.params, state.batch_stats, totals, batch))
      reports.append(same[key])
  if "collect" in programs and config.analysis.collect_every_steps:
    log("collect")
    n = exp.local_micro_batch_size * tpu_slice.hosts
    batch = {"image": images(n, config.image_size), "label": sds((n,), jnp.int32, data)}
    step = train.make_collect_step(exp, mesh)
    reports.append(_measure("collect", step, (state.params, state.batch_stats, state.step, batch)))
  if "sharpness" in programs:
    log("sharpness")
    reports.append(sharpness_program(config, tpu_slice, devices, state))
  return reports


def sharpness_program(
  config: ml_collections.ConfigDict, tpu_slice: Slice, devices: list, state
) -> Report:
  """The power iteration of `python -m pf_jax.analysis sharpness` (`analysis/sharpness.py`),
  compiled as that tool builds it: one process on one host's devices (`jax.local_devices()`),
  the first `analysis.sharpness_examples` training examples in batches of
  `analysis.sharpness_batch_size`, dealt to the devices (padded to a multiple of them), float32,
  the batch statistics closed over as constants (zeros here: their values do not change the
  program). Its FLOPs are those of `analysis.sharpness_iters` iterations, the most it runs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from pf_jax import dataset_catalog  # pylint: disable=g-import-not-at-top
  from pf_jax import experiment  # pylint: disable=g-import-not-at-top
  from pf_jax import reporting  # pylint: disable=g-import-not-at-top
  from pf_jax.analysis import hessian  # pylint: disable=g-import-not-at-top
  from pf_jax.analysis import sharpness  # pylint: disable=g-import-not-at-top

  a = config.analysis
  spec = dataset_catalog.DATASETS[config.dataset]
  host = [d for d in devices if d.process_index == devices[0].process_index]
  batch_size = min(a.sharpness_batch_size, a.sharpness_examples)
  num_batches = max(min(a.sharpness_examples, spec.train_examples) // batch_size, 1)
  dealt = num_batches + (-num_batches % len(host))
  exp = experiment.build(
    config,
    num_classes=spec.num_classes,
    num_train_examples=spec.train_examples,
    num_devices=len(host),
  )
  batch_stats = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state.batch_stats)
  loss_fn = sharpness.loss_function(config, exp, batch_stats)
  dtype = jax.tree.leaves(state.params)[0].dtype
  mesh = Mesh(np.asarray(host), (hessian.AXIS,))
  program = hessian.power_iteration_program(
    loss_fn,
    mesh,
    num_batches,
    dtype,
    num_iters=a.sharpness_iters,
    tol=a.sharpness_tol,
    progress=lambda i, eig: None,  # the tool's progress lines: a host callback in the loop
  )
  rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(hessian.AXIS))
  sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  params = jax.tree.map(lambda x: sds(x.shape, x.dtype, rep), state.params)
  size = config.image_size
  batches = {
    "image": sds((dealt, batch_size, size, size, 3), jnp.float32, split),
    "label": sds((dealt, batch_size), jnp.int32, split),
  }
  weights = sds((dealt,), dtype, split)
  key = sds((2,), jnp.uint32, rep)
  r = _measure("sharpness", program, (params, batches, weights, key), while_trips=a.sharpness_iters)
  where = ("host 0's " if tpu_slice.hosts > 1 else "") + reporting.plural(
    len(host), tpu_slice.per_device
  )
  r.note = (
    f"one call: up to {a.sharpness_iters} power iterations over {num_batches} batches of "
    f"{batch_size} on {where}"
  )
  return r


def format_line(r: Report, tpu_slice: Slice) -> str:
  """One program's line: memory against HBM, FLOPs, the time bound and (train) the run's days."""
  g = lambda b: f"{b / GIB:.3g}"
  unit = tpu_slice.per_device
  if r.refused:
    return (
      f"{r.program}: DOES NOT FIT {g(r.total_bytes)} GiB/{unit} of {tpu_slice.hbm_gib:g} (XLA: "
      f"{r.refused}) [compiled in {r.compile_seconds:.0f} s]"
    )
  line = (
    f"{r.program}: {'fits' if r.fits(tpu_slice) else 'DOES NOT FIT'} {g(r.total_bytes)} GiB/{unit} "
    f"of {tpu_slice.hbm_gib:g} (arguments {g(r.argument_bytes)} + temporaries {g(r.temp_bytes)} + "
    f"outputs {g(r.output_bytes)}"
    + (f" - donated {g(r.alias_bytes)}" if r.alias_bytes else "")
    + f"), {r.step_flops / 1e12:.3g} TFLOP/{unit}/call"
    + (
      f" (XLA counts {r.flops / 1e12:.3g}: a loop's body once)" if r.matmul_flops > r.flops else ""
    )
    + f", >= {r.bound_ms(tpu_slice):.3g} ms/call at {tpu_slice.peak_flops / 1e12:g} TFLOP/s"
  )
  if r.calls:
    days = r.calls * r.bound_ms(tpu_slice) / 1e3 / 86400
    line += f"; {r.calls} steps >= {days:.3g} days"
  if r.note:
    line += f"; {r.note}"
  if r.same_as:
    return line + f" [the program of {r.same_as}]"
  return line + f" [compiled in {r.compile_seconds:.0f} s]"


def describe_slice(config: ml_collections.ConfigDict, tpu_slice: Slice) -> str:
  """The slice, its devices and how each step's global batch is split over hosts and devices."""
  from pf_jax import reporting  # pylint: disable=g-import-not-at-top

  per_chip = {
    "core": f"{tpu_slice.devices // tpu_slice.chips} devices per chip (one per TensorCore)"
  }.get(
    tpu_slice.per_device,
    "1 device per chip" + (" (megacore)" if tpu_slice.generation in ("v4", "v5p") else ""),
  )
  gb = config.global_batch_size
  spec = CHIPS[tpu_slice.generation]
  line = (
    f"compiled for {tpu_slice.name} (topology {tpu_slice.topology}; per chip {spec['hbm_gib']} GiB HBM, "
    f"{spec['peak_tflops']} TFLOP/s bf16): {reporting.plural(tpu_slice.chips, 'chip')}, "
    f"{reporting.plural(tpu_slice.devices, 'device')}, {per_chip}; "
    f"global batch {gb} = {gb // tpu_slice.devices} per device"
  )
  if config.grad_accum_steps > 1:
    line += f" ({config.grad_accum_steps} micro-batches of {gb // tpu_slice.devices // config.grad_accum_steps})"
  exp = build_experiment(config, tpu_slice)
  if exp.spec is not None:
    from pf_jax import sam_family  # pylint: disable=g-import-not-at-top

    n_chunks, group = sam_family.chunking(exp.spec.m, exp.per_device_batch, exp.num_devices)
    if group == 1 and n_chunks > 1:
      strategy = sam_family.chunk_strategy(exp.spec.chunk_mode, n_chunks, "tpu")
      line += f"; m {exp.spec.m}: {n_chunks} chunks per device, {strategy} on TPU"
  if tpu_slice.hosts > 1:
    line += (
      f"; {tpu_slice.hosts} hosts (one process each, compiled here from one): each host reads "
      f"{gb // tpu_slice.hosts} examples of every batch from its own 1/{tpu_slice.hosts} of the training split, "
      f"the batch's rows of its {tpu_slice.devices // tpu_slice.hosts} devices"
    )
  else:
    line += "; 1 host"
  return line


def _candidates(config: ml_collections.ConfigDict, exp) -> list[tuple[str, dict]]:
  """Changes that lower the train step's memory, cheapest first: (description, overrides)."""
  from pf_jax import sam_family  # pylint: disable=g-import-not-at-top

  out = []
  if exp.spec is not None:
    n_chunks, _ = sam_family.chunking(exp.spec.m, exp.per_device_batch, exp.num_devices)
    if n_chunks > 1 and sam_family.chunk_strategy(config.sam.chunk_mode, n_chunks, "tpu") != "scan":
      out.append(("sam.chunk_mode=scan", {"sam.chunk_mode": "scan"}))
  if not config.mixed_precision:
    out.append(("mixed_precision=True (bfloat16)", {"mixed_precision": True}))
  for k in (2, 4, 8, 16, 32):
    steps = config.grad_accum_steps * k
    out.append((f"grad_accum_steps={steps}", {"grad_accum_steps": steps}))
  return out


def _with(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` ({"sam.chunk_mode": "scan", ...}) set."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, name = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[name] = value
  return config


def _halvings(config: ml_collections.ConfigDict, field: str) -> list[tuple[str, dict]]:
  """`field` (e.g. "analysis.sharpness_batch_size") at 1/2, 1/4, 1/8, 1/16 of its value."""
  value = _with(config, {})
  for part in field.split("."):
    value = value[part]
  return [(f"{field}={value // k}", {field: value // k}) for k in (2, 4, 8, 16) if value // k]


# What each program's fix search tries (its memory's levers), for the line when none fits.
_TRIED = {
  "train": "scan chunks, bfloat16, accumulation",
  "collect": "scan chunks, bfloat16, accumulation (its batch is the training micro-batch)",
  "eval": "smaller eval_batch_size",
  "sharpness": "smaller analysis.sharpness_batch_size",
}


def _kind(program: str) -> str:
  return program.split("/")[0]  # "eval/imagenet2012" -> "eval"


def suggest_fit(
  config: ml_collections.ConfigDict, tpu_slice: Slice, devices: list, program: str, log=None
):
  """The first change with which `program` compiles, on the same devices, to fit the HBM:
  (description, its compiled Report) or None. Tried in order: for the train step and the
  output collection (whose batch is the training micro-batch) `_candidates`; for an eval step
  half, a quarter, ... the eval_batch_size; for the sharpness program the same of
  analysis.sharpness_batch_size (fewer examples at once, the same examples)."""
  from pf_jax import config_validation  # pylint: disable=g-import-not-at-top

  kind = _kind(program)
  if kind in ("train", "collect"):
    candidates = _candidates(config, build_experiment(config, tpu_slice))
  elif kind == "eval":
    candidates = _halvings(config, "eval_batch_size")
  else:
    candidates = _halvings(config, "analysis.sharpness_batch_size")
  for text, overrides in candidates:
    changed = _with(config, overrides)
    try:
      config_validation.validate(changed, tpu_slice.devices, tpu_slice.hosts)
    except ValueError:
      continue
    if log:
      log(f"trying {text}")
    reports = [
      r for r in compile_programs(changed, tpu_slice, devices, (kind,)) if r.program == program
    ]
    if reports and reports[0].fits(tpu_slice):
      return text, reports[0]
  return None


def check(
  config: ml_collections.ConfigDict, tpu_slice: Slice, out=None, err=None, devices=None
) -> int:
  """Compiles every program of `config` for `tpu_slice`, prints one line each; 0 if all fit, else 2 (with one
  stderr line per program that does not fit, naming a change that `suggest_fit` compiled to
  fit)."""
  out = out or sys.stdout
  err = err or sys.stderr
  devices = devices or topology_devices(tpu_slice)
  print(describe_slice(config, tpu_slice), file=out, flush=True)
  status = 0
  for r in compile_programs(config, tpu_slice, devices):
    print(format_line(r, tpu_slice), file=out, flush=True)
    if r.fits(tpu_slice):
      continue
    status = 2
    found = suggest_fit(config, tpu_slice, devices, r.program)
    need = f"{r.total_bytes / GIB:.2f} GiB per {tpu_slice.per_device}, {tpu_slice.name} has {tpu_slice.hbm_gib:g}"
    if found:
      text, fixed = found
      hint = (
        f"fits with --config.{text.split(' ')[0]} (compiled: {fixed.total_bytes / GIB:.2f} GiB)"
      )
    else:
      hint = f"no change tried fits ({_TRIED[_kind(r.program)]}): use a larger slice"
    err.write(f"error: {r.program} does not fit on {tpu_slice.name}: needs {need}; {hint}\n")
    err.flush()
  return status


def main(config: ml_collections.ConfigDict, slice_name: str, note: str | None = None) -> int:
  """`main.py --check_only --compile_for=<slice>`: validates `c` for the slice's devices and
  hosts, then `check`. Bad input raises ValueError (one line: CompileForError, ConfigError)."""
  import jax  # pylint: disable=g-import-not-at-top

  from pf_jax import config_validation  # pylint: disable=g-import-not-at-top
  from pf_jax import process  # pylint: disable=g-import-not-at-top
  from pf_jax import reporting  # pylint: disable=g-import-not-at-top

  s = parse_slice(slice_name)
  if not os.environ.get("JAX_PLATFORMS"):  # compile-only devices: no probing for a TPU here
    jax.config.update("jax_platforms", "cpu")
  # A compile-only executable cannot be loaded back from JAX's persistent cache (there is no TPU
  # client): neither written nor read.
  jax.config.update("jax_enable_compilation_cache", False)
  config_validation.validate(config, s.devices, s.hosts)
  print("config OK")
  print(reporting.describe_run(config, s.devices, None, note, platform="tpu"))
  with process.quiet_native_stderr():  # TensorFlow's import
    from pf_jax import train  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  with quiet_libtpu():
    return check(config, s)


# What libtpu writes to stderr on a machine without a TPU (it finds no TPU VM metadata).
_LIBTPU_NOISE = re.compile(
  r"(WARNING: Logging before InitGoogle|E0000 .*(common_lib|libtpu)|=== Source Location Trace|"
  r"learning/|Failed to find host bounds|\s*$)"
)


@contextlib.contextmanager
def quiet_libtpu():
  """Drops libtpu's lines about the missing TPU VM (fd 2); other lines are written afterwards."""
  with tempfile.TemporaryFile() as tmp:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      lines = tmp.read().decode(errors="replace").splitlines(True)
      kept = [line for line in lines if not _LIBTPU_NOISE.match(line)]
      if kept:
        os.write(2, "".join(kept).encode())
