"""`main.py --check_only --compile_for=<slice>` (pf_jax/tpu_compile.py): TPU slices and the run's
programs compiled for a TPU topology on this CPU machine. The compiling tests skip without libtpu
(pip install -e ".[tpu]")."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from pf_jax import tpu_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason='libtpu not installed (pip install ".[tpu]")'
)


@pytest.fixture
def no_persistent_cache(monkeypatch):
  """A compile-only program cannot be written to or read from JAX's persistent cache. Setting
  `jax_enable_compilation_cache` is not enough once an earlier test in this process has used
  the cache (JAX decides once per process), so the decision itself is patched, as in
  test_compilation.py."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(compilation_cache, "is_cache_used", lambda backend: False)
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", cache)


# Cloud TPU's documented slices: v2/v3 names count TensorCores (2 per chip, one JAX device each,
# 8 per host); v4/v5p names count TensorCores of megacore chips (one device per chip, 4 chips per
# host); v5e/v6e names count chips (one core each; one host up to 8 chips, 4 per host beyond).
@pytest.mark.parametrize(
  "name, chips, devices, hosts, topology",
  [
    ("v2-8", 4, 8, 1, "v2:2x2"),
    ("v3-8", 4, 8, 1, "v3:2x2"),
    ("v3-32", 16, 32, 4, "v3:4x4"),
    ("v4-8", 4, 4, 1, "v4:2x2x1"),
    ("v4-32", 16, 16, 4, "v4:2x2x4"),
    ("v5p-16", 8, 8, 2, "v5p:2x2x2"),
    ("v5litepod-8", 8, 8, 1, "v5e:2x4"),
    ("v5e-16", 16, 16, 4, "v5e:4x4"),
    ("v5litepod-64", 64, 64, 16, "v5e:8x8"),
    ("v6e-8", 8, 8, 1, "v6e:2x4"),
  ],
)
def test_slices(name, chips, devices, hosts, topology):
  s = tpu_compile.parse_slice(name)
  assert (s.chips, s.devices, s.hosts, s.topology) == (chips, devices, hosts, topology)


def test_hbm_and_peak_are_per_device():
  # A v3 core has half the chip's 32 GiB and 123 TFLOP/s; a v4 megacore device has the whole chip.
  v3, v4 = tpu_compile.parse_slice("v3-8"), tpu_compile.parse_slice("v4-8")
  assert (v3.hbm_gib, v3.peak_flops, v3.per_device) == (16, 61.5e12, "core")
  assert (v4.hbm_gib, v4.peak_flops, v4.per_device) == (32, 275e12, "chip")


@pytest.mark.parametrize("name", ["v4-7", "v4", "tpu-v4-8", "v5e-12", "a100-8"])
def test_bad_slice(name):
  with pytest.raises(tpu_compile.CompileForError, match=re.escape(repr(name))):
    tpu_compile.parse_slice(name)


def test_without_libtpu_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
  with pytest.raises(tpu_compile.CompileForError, match=r'pip install -e "\.\[tpu\]"'):
    tpu_compile.topology_devices(tpu_compile.parse_slice("v4-8"))


@needs_libtpu
@pytest.mark.parametrize("name", ["v3-32", "v4-8", "v5litepod-16", "v6e-8"])
def test_topology_has_the_slices_devices(name):
  s = tpu_compile.parse_slice(name)
  devices = tpu_compile.topology_devices(s)  # checks the count and the hosts itself
  assert {d.platform for d in devices} == {"tpu"}
  assert len({tuple(d.coords) for d in devices}) == s.chips


def run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "main.py", "--check_only", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


def test_multi_host_slice_says_how_each_host_reads_the_batch():
  """A v4-32 is 16 chips on 4 hosts of 4: a global batch of 256 is 16 per chip and 64 per host,
  each host reading its own quarter of the training split."""
  from pf_jax import cli  # pylint: disable=g-import-not-at-top

  c = cli.build_config(None, [("global_batch_size", "256")])
  line = tpu_compile.describe_slice(c, tpu_compile.parse_slice("v4-32"))
  assert "16 chips, 16 devices, 1 device per chip (megacore); global batch 256 = 16 per device" in (
    line
  )
  assert line.endswith(
    "; 4 hosts (one process each, compiled here from one): each host reads 64 examples of every "
    "batch from its own 1/4 of the training split, the batch's rows of its 4 devices"
  )


def test_method_line_shows_the_chunks_as_the_tpu_runs_them(monkeypatch, capsys):
  """The default config's m = 32 at 64 images per chip (a global batch of 256 on a v4-8's 4
  chips) is 2 chunks per chip: `chunk_mode="auto"` scans them on TPU (from 2 chunks), while the
  CPU unrolls up to 16. The `method:` line of `--compile_for` says the TPU's."""
  import jax  # pylint: disable=g-import-not-at-top

  from pf_jax import cli  # pylint: disable=g-import-not-at-top
  from pf_jax import reporting  # pylint: disable=g-import-not-at-top

  checked = []
  monkeypatch.setattr(tpu_compile, "check", lambda c, s: checked.append(s.name) or 0)
  c = cli.build_config(None, [("global_batch_size", "256")])
  cache = jax.config.jax_enable_compilation_cache
  try:
    assert tpu_compile.main(c, "v4-8") == 0
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  assert checked == ["v4-8"]
  method = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("method:"))
  assert "m 32 (2 chunks per device, scan)" in method
  assert "m 32 (2 chunks per device, unroll)" in reporting.describe_method(c, 4, "cpu")


def vit_digits_forward_matmuls() -> tuple[int, int, int, int]:
  """(depth, one block's, the patch embedding's, the head's) forward matmul FLOPs per image of
  vit_digits (8x8 images, 2x2 patches: 16 tokens, width 64, depth 2, MLP 128, 10 classes),
  counted by hand: a matmul of [a, b] x [b, c] is 2abc."""
  tokens, width, mlp, depth, patch, classes = 16, 64, 128, 2, 2, 10
  layer = 2 * tokens * (4 * width * width + 2 * width * mlp)  # q, k, v, out; MLP in, out
  layer += 2 * 2 * tokens * tokens * width  # q k^T and attention x v
  return depth, layer, 2 * tokens * patch * patch * 3 * width, 2 * width * classes


def vit_digits_step_flops(batch: int) -> int:
  """Matmul FLOPs of one plain training step of vit_digits: the backward pass costs twice the
  forward (gradients of both operands), except the patch embedding, whose input (the image)
  needs no gradient."""
  depth, layer, embed, head = vit_digits_forward_matmuls()
  return batch * (3 * depth * layer + 2 * embed + 3 * head)


@needs_libtpu
@pytest.mark.heavy  # a main.py run compiling two programs: scheduled first (tests/conftest.py)
def test_plain_step_compiled_for_v4_8():
  """The command's lines, and XLA's FLOPs per chip of a plain step against the hand count: the
  global batch of 256 is 64 per chip on a v4-8's 4 chips. XLA also counts the elementwise work
  (LayerNorm, GELU, softmax, AdamW), about 18% more for this narrow model."""
  out = run_main(
    "--compile_for=v4-8",
    "--config.sam.perturbation=none",
    "--config.sam.asam=none",
    "--config.global_batch_size=256",
  )
  assert out.returncode == 0, out.stderr
  assert out.stderr == ""
  lines = out.stdout.splitlines()
  assert lines[0] == "config OK"
  assert lines[3].startswith("compiled for v4-8 (topology v4:2x2x1; per chip 32 GiB HBM, 275 ")
  assert (
    "4 chips, 4 devices, 1 device per chip (megacore); global batch 256 = 64 per device"
    in (lines[3])
  )
  train = next(line for line in lines if line.startswith("train: fits "))
  assert next(line for line in lines if line.startswith("eval/digits: fits "))
  # The sharpness tool's power iteration: the config's 2048 examples are more than digits' 1438
  # training images, so 1438 // 256 = 5 batches (dealt to the 4 chips as 8, 3 of zero weight).
  sharpness = next(line for line in lines if line.startswith("sharpness: fits "))
  assert "up to 100 power iterations over 5 batches of 256 on 4 chips" in sharpness
  tflop = float(re.search(r"([\d.e+-]+) TFLOP/chip/call", train).group(1))
  hand = vit_digits_step_flops(256) / 4
  assert hand <= tflop * 1e12 <= 1.25 * hand, (tflop * 1e12, hand)
  ms = float(re.search(r">= ([\d.e+-]+) ms/call at 275 TFLOP/s", train).group(1))
  assert ms == pytest.approx(tflop * 1e12 / 275e12 * 1e3, rel=0.01)


@needs_libtpu
@pytest.mark.parametrize("sam, factor", [("none", 1), ("steepest", 2)])
def test_matmul_count_of_the_traced_step(monkeypatch, sam, factor):
  """The step's matmuls counted from its trace (no compilation) equal the hand count, per chip of a
  v4-8: the plain step once, SAM's twice (ascent and descent passes), with its 2 m-chunks per
  chip in a `scan`, whose body XLA's own count would see once."""
  from pf_jax import cli  # pylint: disable=g-import-not-at-top

  def trace_only(name, jitted, args, calls=None):
    flops = tpu_compile.matmul_flops(jitted.trace(*args).jaxpr)
    return tpu_compile.Report(name, 0, 0, 0, 0, 0.0, 0.0, calls, matmul_flops=flops)

  monkeypatch.setattr(tpu_compile, "_measure", trace_only)
  c = cli.build_config(
    None,
    [
      ("sam.perturbation", sam),
      ("sam.asam", "none"),
      ("sam.chunk_mode", "scan"),
      ("global_batch_size", "256"),
    ],
  )
  s = tpu_compile.parse_slice("v4-8")
  (r,) = tpu_compile.compile_programs(c, s, tpu_compile.topology_devices(s), ("train",))
  assert r.matmul_flops == factor * vit_digits_step_flops(256) / 4


def trace_only(name, jitted, args, calls=None, while_trips=1):
  """`tpu_compile._measure` without compiling: the traced program's matmul FLOPs (loops
  multiplied out), and its first argument's element count (the parameters) as its bytes."""
  import jax  # pylint: disable=g-import-not-at-top

  flops = tpu_compile.matmul_flops(jitted.trace(*args).jaxpr, while_trips)
  params = sum(x.size for x in jax.tree.leaves(args[0]))
  return tpu_compile.Report(name, params, 0, 0, 0, 0.0, 0.0, calls, matmul_flops=flops)


@needs_libtpu
def test_sharpness_program_matmuls_against_the_hand_count(monkeypatch):
  """The sharpness tool's program (its power iteration, traced for a v4-8's 4 chips, no
  compilation): 1000 examples in batches of 128 are 7 batches, dealt to the chips as 8 (one of
  zero weight), 2 per chip. Each iteration computes one Hessian-vector product per batch by
  forward-over-reverse: a matmul of two differentiated operands costs 9 times its forward (its
  forward and backward, 3, each with the tangents of both operands), the patch embedding of the
  image, which has no tangent, 4 times (forward and weight gradient, each with the weight's
  tangent); and one v . Hv, 2 FLOPs per parameter. 7 iterations, the configured most."""
  from pf_jax import cli  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(tpu_compile, "_measure", trace_only)
  c = cli.build_config(
    None,
    [
      ("analysis.sharpness_examples", "1000"),
      ("analysis.sharpness_batch_size", "128"),
      ("analysis.sharpness_iters", "7"),
    ],
  )
  s = tpu_compile.parse_slice("v4-8")
  (r,) = tpu_compile.compile_programs(c, s, tpu_compile.topology_devices(s), ("sharpness",))
  depth, layer, embed, head = vit_digits_forward_matmuls()
  hvp = 9 * depth * layer + 4 * embed + 9 * head
  params = r.argument_bytes  # the parameter count (trace_only)
  assert r.matmul_flops == 7 * (2 * 128 * hvp + 2 * params)
  assert r.note == "one call: up to 7 power iterations over 7 batches of 128 on 4 chips"


def collect_config():
  """vit_digits collecting outputs with a plain SAM perturbation (m = 32), global batch 256: 64
  images per chip on a v4-8, 2 chunks."""
  from pf_jax import cli  # pylint: disable=g-import-not-at-top

  return cli.build_config(
    None,
    [
      ("sam.perturbation", "steepest"),
      ("sam.asam", "none"),
      ("global_batch_size", "256"),
      ("analysis.collect_every_steps", "10"),
    ],
  )


def collect_flops_per_chip() -> int:
  """Section 6.1's collection step by hand, per chip: each chunk's forward and the backward that
  gives its ascent direction (a training step's matmuls), then the forward at theta^p."""
  depth, layer, embed, head = vit_digits_forward_matmuls()
  return vit_digits_step_flops(64) + 64 * (depth * layer + embed + head)


@needs_libtpu
def test_collect_program_matmuls_against_the_hand_count(monkeypatch):
  """The output-collection program traced for a v4-8 (no compilation): its matmuls, the chunk
  loop multiplied out, equal the hand count exactly."""
  monkeypatch.setattr(tpu_compile, "_measure", trace_only)
  s = tpu_compile.parse_slice("v4-8")
  devices = tpu_compile.topology_devices(s)
  (r,) = tpu_compile.compile_programs(collect_config(), s, devices, ("collect",))
  assert r.program == "collect"
  assert r.matmul_flops == collect_flops_per_chip()


@needs_libtpu
@pytest.mark.long  # a compilation for a TPU: tens of seconds here
def test_collect_program_compiled_for_v4_8(no_persistent_cache):
  """The same program compiled by the TPU compiler: it fits a v4 chip, and XLA's own count, which
  sees the chunk loop's body once (one of the 2 chunks) and also counts the softmaxes, norms and
  the perturbation, is at least that chunk's hand-counted matmuls and at most a quarter above."""

  s = tpu_compile.parse_slice("v4-8")
  devices = tpu_compile.topology_devices(s)
  (r,) = tpu_compile.compile_programs(collect_config(), s, devices, ("collect",))
  assert r.fits(s) and 0 < r.total_bytes < 2**30
  one_chunk = collect_flops_per_chip() / 2
  assert one_chunk <= r.flops <= 1.25 * one_chunk, (r.flops, one_chunk)


def test_refused_with_the_first_fix_that_compiles_to_fit(monkeypatch):
  """Exit status 2 and one stderr line per program that does not fit, naming the first change
  (scan the chunks, bfloat16, then 2, 4, ... times the accumulation) whose compiled program fits.
  The compiler is replaced by a memory model: 40 GiB at 256 images per micro-batch in float32,
  proportional to the micro-batch, halved by bfloat16, whatever the chunk mode; the eval step
  always fits. The chip: a 16 GiB v5e."""
  import io  # pylint: disable=g-import-not-at-top

  from pf_jax import cli  # pylint: disable=g-import-not-at-top

  compiled = []

  def compile_programs(c, s, devices, programs=("train", "eval", "collect"), log=None):
    compiled.append((c.sam.chunk_mode, c.mixed_precision, c.grad_accum_steps, programs))
    micro = c.global_batch_size // s.devices // c.grad_accum_steps
    train = 40 * tpu_compile.GIB * micro / 256 / (2 if c.mixed_precision else 1)
    reports = [tpu_compile.Report("train", 0, int(train), 0, 0, 1e12, 1.0, 10)]
    if "eval" in programs:
      reports.append(tpu_compile.Report("eval/digits", 0, 2**20, 0, 0, 1e9, 1.0))
    return reports

  monkeypatch.setattr(tpu_compile, "compile_programs", compile_programs)
  c = cli.build_config(None, [("global_batch_size", "256"), ("sam.chunk_mode", "scan")])
  c.mixed_precision = True  # bfloat16 already: 20 GiB; 2x accumulation 10 GiB
  out, err = io.StringIO(), io.StringIO()
  s = tpu_compile.parse_slice("v5litepod-1")
  assert tpu_compile.check(c, s, out, err, devices=["fake"]) == 2
  assert err.getvalue() == (
    "error: train does not fit on v5litepod-1: needs 20.00 GiB per chip, v5litepod-1 has 16; "
    "fits with --config.grad_accum_steps=2 (compiled: 10.00 GiB)\n"
  )
  assert compiled[-1] == ("scan", True, 2, ("train",))  # the fix was compiled
  assert "train: DOES NOT FIT 20 GiB/chip of 16" in out.getvalue()
  assert "eval/digits: fits " in out.getvalue()

  c.mixed_precision, c.sam.chunk_mode = False, "unroll"  # 40 GiB
  compiled.clear()
  err = io.StringIO()
  assert tpu_compile.check(c, s, io.StringIO(), err, devices=["fake"]) == 2
  # scan (still 40 GiB: the model ignores it), then bfloat16 (20), then 2x accumulation (20),
  # 4x accumulation (10 GiB): the first that fits.
  assert [x[:3] for x in compiled[1:]] == [
    ("scan", False, 1),
    ("unroll", True, 1),
    ("unroll", False, 2),
    ("unroll", False, 4),
  ]
  assert err.getvalue().endswith("fits with --config.grad_accum_steps=4 (compiled: 10.00 GiB)\n")


def test_sharpness_refused_with_a_smaller_batch_that_compiles_to_fit(monkeypatch):
  """The sharpness program's fix is a smaller `analysis.sharpness_batch_size` (the same examples,
  fewer at once): with a memory model of 40 GiB at 256 examples per batch, proportional to it, a
  16 GiB v5e chip fits it at 64 (10 GiB), after 128 (20 GiB) was compiled and did not fit; with
  at most 2 GiB no halving fits, and the line says what was tried."""
  import io  # pylint: disable=g-import-not-at-top

  from pf_jax import cli  # pylint: disable=g-import-not-at-top

  compiled = []

  def compile_programs(c, s, devices, programs=("train", "eval", "collect", "sharpness"), log=None):
    size = c.analysis.sharpness_batch_size
    compiled.append((size, programs))
    reports = [tpu_compile.Report("train", 0, 2**30, 0, 0, 1e12, 1.0, 10)]
    sharpness = tpu_compile.Report("sharpness", 0, int(40 * 2**30 * size / 256), 0, 0, 1e9, 1.0)
    return [r for r in reports + [sharpness] if r.program in programs]

  monkeypatch.setattr(tpu_compile, "compile_programs", compile_programs)
  c = cli.build_config(None, [("analysis.sharpness_batch_size", "256")])
  s = tpu_compile.parse_slice("v5litepod-1")
  err = io.StringIO()
  assert tpu_compile.check(c, s, io.StringIO(), err, devices=["fake"]) == 2
  assert compiled[1:] == [(128, ("sharpness",)), (64, ("sharpness",))]
  assert err.getvalue() == (
    "error: sharpness does not fit on v5litepod-1: needs 40.00 GiB per chip, v5litepod-1 has 16; "
    "fits with --config.analysis.sharpness_batch_size=64 (compiled: 10.00 GiB)\n"
  )
  chip = dict(tpu_compile.CHIPS["v5e"], hbm_gib=2)
  monkeypatch.setitem(tpu_compile.CHIPS, "v5e", chip)
  err = io.StringIO()
  assert tpu_compile.check(c, s, io.StringIO(), err, devices=["fake"]) == 2
  assert err.getvalue() == (
    "error: sharpness does not fit on v5litepod-1: needs 40.00 GiB per chip, v5litepod-1 has 2; "
    "no change tried fits (smaller analysis.sharpness_batch_size): use a larger slice\n"
  )


@needs_libtpu
@pytest.mark.long  # two compilations for a TPU: tens of seconds; CI runs it (-m long)
def test_refused_and_the_named_fix_compiled_for_the_tpu_to_fit(monkeypatch, no_persistent_cache):
  """The same with the TPU compiler itself: a plain float32 step of vit_digits at 2048 images,
  compiled for a v5e chip whose HBM is set, once the run's step has compiled, to 80% of what
  that step needs. The first change tried, bfloat16, is named only because its own compiled
  program (here: about 65% of float32's, activations in half the bytes) fits in that 80%,
  compiled on the same compile-only devices. The eval and sharpness programs are left out (small,
  and each a compilation more)."""
  import io  # pylint: disable=g-import-not-at-top

  from pf_jax import cli  # pylint: disable=g-import-not-at-top

  real = tpu_compile.compile_programs
  compiled = []
  chip = dict(tpu_compile.CHIPS["v5e"])
  monkeypatch.setitem(tpu_compile.CHIPS, "v5e", chip)

  def train_only(c, s, devices, programs=("train", "eval", "collect", "sharpness"), log=None):
    (r,) = real(c, s, devices, ("train",))
    compiled.append((c.mixed_precision, c.grad_accum_steps, devices, r))
    if len(compiled) == 1:
      chip["hbm_gib"] = 0.8 * r.total_bytes / tpu_compile.GIB
    return [r]

  monkeypatch.setattr(tpu_compile, "compile_programs", train_only)
  c = cli.build_config(
    None,
    [("sam.perturbation", "none"), ("sam.asam", "none"), ("global_batch_size", "2048")],
  )
  s = tpu_compile.parse_slice("v5litepod-1")
  devices = tpu_compile.topology_devices(s)
  out, err = io.StringIO(), io.StringIO()
  assert tpu_compile.check(c, s, out, err, devices=devices) == 2
  assert [x[:3] for x in compiled] == [(False, 1, devices), (True, 1, devices)]
  need, fixed = compiled[0][3].total_bytes, compiled[1][3].total_bytes
  hbm = chip["hbm_gib"] * tpu_compile.GIB
  assert fixed <= hbm < need
  assert fixed < 0.75 * need  # bfloat16 activations: not just under the line by chance
  assert err.getvalue() == (
    f"error: train does not fit on v5litepod-1: needs {need / tpu_compile.GIB:.2f} GiB per chip, "
    f"v5litepod-1 has {chip['hbm_gib']:g}; fits with --config.mixed_precision=True (compiled: "
    f"{fixed / tpu_compile.GIB:.2f} GiB)\n"
  )
  assert out.getvalue().splitlines()[1].startswith("train: DOES NOT FIT ")


@needs_libtpu
def test_xla_refusing_a_program_is_a_line_not_a_traceback():
  """The TPU compiler itself refuses a program above the chip's HBM (RESOURCE_EXHAUSTED): three
  float32 copies of 2^31 elements, 24 GiB of output, on a 16 GiB v5e chip."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  s = tpu_compile.parse_slice("v5litepod-1")
  mesh = Mesh(np.asarray(tpu_compile.topology_devices(s)), ("data",))
  x = jax.ShapeDtypeStruct((2**31,), jnp.float32, sharding=NamedSharding(mesh, P()))
  step = jax.jit(lambda x: jnp.concatenate([x * i for i in range(3)]))
  r = tpu_compile._measure("train", step, (x,))  # pylint: disable=protected-access
  assert r.refused and not r.fits(s)
  assert r.total_bytes >= 24 * tpu_compile.GIB
  line = tpu_compile.format_line(r, s)
  assert line.startswith("train: DOES NOT FIT ") and "\n" not in line


@needs_libtpu
def test_auto_chunk_strategy_sees_the_target_platform():
  """`"auto"` resolves by the platform the step is traced for: the shard_map mesh's devices (a TPU
  topology's compile-only devices on this CPU machine), so CPU runs keep the CPU rule."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from pf_jax import sam_family  # pylint: disable=g-import-not-at-top

  seen = []

  def f(x):
    seen.append(sam_family._platform())  # pylint: disable=protected-access
    return x

  tpu = tpu_compile.topology_devices(tpu_compile.parse_slice("v5litepod-1"))
  for devices in (jax.devices()[:1], tpu):
    mesh = Mesh(np.asarray(devices), ("data",))
    step = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    step.trace(jax.ShapeDtypeStruct((8,), jnp.float32))
  assert seen == ["cpu", "tpu"]


def test_auto_scans_on_tpu_and_keeps_the_cpu_rule():
  from pf_jax import sam_family  # pylint: disable=g-import-not-at-top

  tpu = [sam_family.chunk_strategy("auto", n, "tpu") for n in (2, 8, 16, 64)]
  cpu = [sam_family.chunk_strategy("auto", n, "cpu") for n in (2, 8, 16, 64)]
  assert tpu == ["scan"] * 4
  assert cpu == ["unroll", "unroll", "unroll", "scan"]
  assert sam_family.chunk_strategy("unroll", 64, "tpu") == "unroll"  # an explicit mode stays


def test_tpu_pod_compile_check_runs_the_command():
  """`launch/tpu_pod.py --compile_check` runs `main.py --check_only --compile_for=<its
  --accelerator_type>` before anything else and stops with its exit status and line."""
  out = subprocess.run(
    [
      sys.executable,
      "launch/tpu_pod.py",
      "--name=pf-test",
      "--zone=europe-west4-a",
      "--accelerator_type=v4-7",
      "--config=configs/default.py",
      "--workdir=gs://bucket/run",
      "--no_check",
      "--compile_check",
      "--dry_run",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2
  assert out.stdout == ""  # stopped before printing any gcloud command
  assert out.stderr.splitlines() == [
    "error: --compile_for: 'v4-7': unknown v4 slice size; known: v4-8, v4-16, v4-32, v4-64, "
    "v4-128, v4-256, v4-512, v4-1024"
  ]
