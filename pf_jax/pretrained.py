"""config.init_from: the weights a run fine-tunes from (a pf_jax run or a PyTorch checkpoint).

`check` compares them with the config's model before anything compiles (shapes from
`jax.eval_shape`), so `--check_only` refuses another model's weights in one line naming the first
key that does not fit; `load` puts them into a fresh state (every leaf but the head) and says what
it loaded, for the run's start line. No TensorFlow here.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax import checkpointing
from pf_jax import config_fields
from pf_jax import config_validation
from pf_jax import models
from pf_jax import reporting

HEAD = "head"  # every model's classifier: fine-tuning keeps its own, freshly initialized


def read(path: str, model_name: str) -> tuple[Any, Any, str]:
  """(params, batch_stats, where they came from in words) of `path`; ConfigError naming
  config.init_from when it cannot be read or converted to `model_name`."""
  try:
    if models.torch_weights.is_torch_checkpoint(path):
      state_dict = models.torch_weights.read_checkpoint(path)
      variables = models.from_torch(model_name, state_dict)
      return variables["params"], variables["batch_stats"], "a PyTorch checkpoint"
    params, batch_stats, step = checkpointing.load_variables(path)
    return params, batch_stats, f"the step-{step} checkpoint of a pf_jax run"
  except ValueError as e:
    raise config_validation.ConfigError("init_from", path, str(e)) from None


def mismatch(fresh, pretrained, path: str, model_name: str) -> str | None:
  """The first leaf of `fresh` (the head excepted) that `pretrained` lacks or has in another
  shape, in words, or None when every one fits."""
  if isinstance(fresh, Mapping):
    for key, value in fresh.items():
      if key == HEAD:
        continue
      if not isinstance(pretrained, Mapping) or key not in pretrained:
        return f"{path}/{key} is missing there"
      found = mismatch(value, pretrained[key], f"{path}/{key}", model_name)
      if found:
        return found
    return None
  if tuple(fresh.shape) != tuple(np.shape(pretrained)):
    got, want = tuple(np.shape(pretrained)), tuple(fresh.shape)
    return f"{path} has shape {got} there, {model_name} needs {want}"
  return None


def _merge(fresh, pretrained):
  if isinstance(fresh, Mapping):
    return {k: v if k == HEAD else _merge(v, pretrained[k]) for k, v in fresh.items()}
  return jnp.asarray(pretrained, fresh.dtype)


def _fit(path: str, model_name: str, fresh_params, fresh_stats, params, batch_stats) -> None:
  for collection, fresh, pretrained in (
    ("params", fresh_params, params),
    ("batch_stats", fresh_stats, batch_stats),
  ):
    problem = mismatch(fresh, pretrained, collection, model_name)
    if problem:
      raise config_validation.ConfigError(
        "init_from", path, f"weights that fit config.model={model_name!r}; {problem}"
      )


def _summary(path: str, source: str, fresh_params, fresh_stats) -> str:
  kept = {k: v for k, v in fresh_params.items() if k != HEAD}
  leaves = jax.tree.leaves(kept)
  stats = " and BatchNorm statistics" if jax.tree.leaves(fresh_stats) else ""
  count = reporting._count(  # the start line's counts
    sum(int(np.prod(x.shape)) for x in leaves)
  )
  return (
    f"weights from {path} ({source}): {len(leaves)} arrays, {count} parameters{stats}; "
    "the head freshly initialized"
  )


def check(config, num_classes: int) -> str:
  """--check_only: reads config.init_from and compares it with `config.model`'s variables (shapes
  from `jax.eval_shape` of its init: nothing compiles). Returns what a run would load.

  Raises:
    config_validation.ConfigError: one line naming config.init_from and the first misfit.
  """
  model = models.build_model(
    config.model, num_classes=num_classes, **config_fields.library_kwargs(config, "build_model")
  )
  dummy = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)
  fresh_params, fresh_stats = shapes["params"], shapes.get("batch_stats", {})
  params, batch_stats, source = read(config.init_from, config.model)
  _fit(config.init_from, config.model, fresh_params, fresh_stats, params, batch_stats)
  return _summary(config.init_from, source, fresh_params, fresh_stats)


def load(exp, state, path: str):
  """(`state` with the variables of `path` but its own head and a fresh optimizer state, the
  start line's words for what was loaded). `state`: a fresh `exp.init_state()` on the host."""
  params, batch_stats, source = read(path, exp.config.model)
  _fit(path, exp.config.model, state.params, state.batch_stats, params, batch_stats)
  merged_stats = _merge(state.batch_stats, batch_stats) if state.batch_stats else {}
  loaded = exp.state_at(_merge(state.params, params), merged_stats)
  return loaded, _summary(path, source, state.params, state.batch_stats)
