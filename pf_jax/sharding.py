"""Cross-device helpers for data parallelism over a named mesh/pmap axis."""

from collections.abc import Hashable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Hashable | Sequence[Hashable]


def axis_size(axis_name: AxisName) -> int:
  """Static number of devices along `axis_name` (inside shard_map/pmap)."""
  return int(lax.axis_size(axis_name))


def group_mean(tree, axis_name: AxisName, group_size: int):
  """Mean of `tree` over consecutive groups of `group_size` devices along `axis_name`.

  Built from `ppermute` because `psum(axis_index_groups=...)` is unavailable under
  shard_map. Power-of-two groups use a butterfly (log2 k exchanges, the same sum on every
  member); other sizes a ring of k - 1 exchanges.
  """
  if group_size == 1:
    return tree
  n = axis_size(axis_name)
  if n % group_size:
    raise ValueError(
      f"m spans {group_size} devices, which does not divide the {n} devices of axis {axis_name!r}"
    )
  total = tree
  if group_size & (group_size - 1) == 0:
    for s in range(group_size.bit_length() - 1):
      perm = [(i, i ^ (1 << s)) for i in range(n)]
      total = jax.tree.map(jnp.add, total, lax.ppermute(total, axis_name, perm))
  else:
    perm = [
      (i, (i // group_size) * group_size + (i % group_size + 1) % group_size) for i in range(n)
    ]
    shifted = tree
    for _ in range(group_size - 1):
      shifted = lax.ppermute(shifted, axis_name, perm)
      total = jax.tree.map(jnp.add, total, shifted)
  return jax.tree.map(lambda x: x / group_size, total)


def _axes(axis_name: AxisName) -> tuple:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def varying_axes(x) -> frozenset:
  """The manual (shard_map) axes over which `x` may differ between devices."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def is_varying(tree, axis_name: AxisName) -> bool:
  """Whether every leaf may differ over `axis_name` (False: replicated, e.g. already averaged)."""
  axes = _axes(axis_name)
  return all(all(a in varying_axes(x) for a in axes) for x in jax.tree.leaves(tree))


def per_device(tree, axis_name: AxisName):
  """Marks replicated leaves as varying over `axis_name`.

  Under shard_map, the gradient with respect to a replicated (invariant) input is implicitly
  summed over devices. SAM needs each device's own gradient (its own perturbation), so the
  parameters are cast to device-varying before differentiating.
  """
  axes = _axes(axis_name)

  def cast(x):
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)
