"""Checkpoints that survive preemption, corruption and divergence.

- Preemption: SIGTERM/SIGINT (single-process runs) or the JAX/orbax preemption notice
  (multi-process runs, all processes agree on the step) save the current step, then training
  raises `Preempted` (signals: `process.SignalCatcher`); main.py exits with
  `PREEMPTED_EXIT_CODE` (pf_jax/process.py) so schedulers requeue the run.
- Finiteness: a state with a non-finite value is never saved (`save` checks every time).
- Fallback: a latest checkpoint that cannot be restored is moved aside (never deleted) into
  `<workdir>/checkpoints.broken/` and the newest one that restores is used.
- Storage faults: a save that fails, or a workdir or checkpoint directory removed during the run
  (`check_intact`), raises StorageError, one line naming the path and the step.

Paths are `etils.epath` paths: `gs://` works like a local directory.
"""

import gc
import logging as py_logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from pf_jax import config_fields
from pf_jax import workdir as workdir_lib
from pf_jax.process import PREEMPTED_EXIT_CODE

BROKEN_DIR = "checkpoints.broken"


class Preempted(Exception):
  """Training stopped on a preemption signal after checkpointing `step`."""

  def __init__(self, step: int, directory):
    super().__init__(
      f"preempted: checkpoint of step {step} saved in {directory}; restart the same "
      f"command to continue (exit code {PREEMPTED_EXIT_CODE})"
    )
    self.step = step


class NonFiniteError(FloatingPointError):
  """Too many consecutive non-finite steps; the message names the last good checkpoint."""


class CheckpointError(ValueError):
  """No checkpoint in a directory can be restored."""


class StorageError(OSError):
  """A checkpoint could not be written (disk full, read-only or vanished directory): one line."""


def as_path(path) -> epath.Path:
  """An absolute epath.Path; URLs such as gs://bucket/run are kept as they are."""
  p = epath.Path(path)
  return p if "://" in str(path) else p.expanduser().resolve()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


@jax.jit
def all_finite(tree) -> jax.Array:
  """True iff every floating-point leaf is finite (pure: usable inside the train step)."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def last_good(mngr: ocp.CheckpointManager) -> str:
  """'step N in DIR' of the newest saved checkpoint, for messages."""
  mngr.wait_until_finished()
  step = mngr.latest_step()
  return f"step {step} in {mngr.directory}" if step is not None else f"none in {mngr.directory}"


def save(
  mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False, config=None
) -> None:
  """Saves `state` unless it holds a non-finite value (then raises NonFiniteError).

  `config` (the run's ConfigDict) is stored with the checkpoint: the run's identity even without
  config.json (`workdir.check_config`).
  """
  if not bool(jax.device_get(all_finite(state))):
    raise NonFiniteError(
      f"the training state at step {step} holds a non-finite value: not saved; "
      f"last good checkpoint: {last_good(mngr)}"
    )
  metadata = {"num_devices": jax.device_count()}
  if config is not None:
    metadata["config"] = workdir_lib.config_metadata(config)
  try:
    mngr.save(step, args=ocp.args.StandardSave(state), force=force, custom_metadata=metadata)
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many kinds)
    raise _storage_error(mngr, step, e) from None


def finish(mngr: ocp.CheckpointManager, step: int) -> None:
  """Waits for the asynchronous save of `step`: StorageError (one line) if it failed."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _storage_error(mngr, step, e) from None


def check_intact(mngr: ocp.CheckpointManager, workdir, step: int) -> None:
  """Raises StorageError (one line) if the workdir, `config.json` or the newest checkpoint this
  run has seen (restored or saved) is gone, removed while the run was going, or if the workdir
  lock this process held (`workdir.held_lock`) was taken over.

  orbax recreates a missing directory at the next save, so without this check an `rm -r` of the
  workdir or of `checkpoints/` during a run would go on silently, writing checkpoints without the
  earlier ones, config.json, events and lock. Call it when no save is in progress (after
  `finish`). With several processes process 0 looks and all follow its decision.
  """
  problem = None
  if jax.process_index() == 0:
    workdir, latest = epath.Path(workdir), mngr.latest_step()
    expected = [workdir, workdir / workdir_lib.CONFIG_FILE]
    if latest is not None:
      expected += [epath.Path(mngr.directory), epath.Path(mngr.directory) / str(latest)]
    gone = next((p for p in expected if not p.exists()), None)
    lock = workdir_lib.held_lock(workdir)
    lost = lock.lost() if lock is not None and gone is None else None
    if gone is not None:
      problem = _removed(gone, step)
    elif lost:
      problem = (
        f"--workdir: {workdir} is no longer this run's: {lost}; this run stops without saving "
        f"step {step} and leaves the workdir to it"
      )
  failed = problem is not None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    failed = bool(multihost_utils.broadcast_one_to_all(failed))
  if failed:
    raise StorageError(problem or f"process 0 stopped the run before saving step {step}")


class RunCheckpoints:
  """One run's checkpoints (`<workdir>/checkpoints`): restore, periodic asynchronous saves and
  their completion reports, the stop after a preemption.

  Args:
    workdir: the run's directory (an `epath.Path`).
    config: the run's config (its checkpointing fields; stored with every checkpoint).
    on_saved: (step, directory) -> None, called once a save has completed.
  """

  def __init__(self, workdir: epath.Path, config, on_saved: Callable[[int, Any], None]):
    self.workdir, self.config, self.on_saved = workdir, config, on_saved
    self.directory = workdir / "checkpoints"
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        **config_fields.library_kwargs(config, "CheckpointManagerOptions"), create=True
      ),
    )
    self._saving = None  # the step whose asynchronous save is not yet reported

  def restore(self, target: Any):
    """The newest state that restores into `target` (`restore_latest`), or None."""
    return restore_latest(self.manager, target)[1]

  def last_good(self) -> str:
    return last_good(self.manager)

  def reached_preemption(self, step: int) -> bool:
    """A TPU/cluster preemption notice (all processes agree on the step)."""
    return self.manager.reached_preemption(step)

  def maybe_save(self, step: int, state: Any, *, due: bool, preempted: bool, last: bool) -> None:
    """Reports an earlier save that completed; saves `state` if `due` (forced when `preempted`);
    when `preempted` or `last`, waits for the save and reports it."""
    if self._saving and (
      due or (jax.process_count() == 1 and not self.manager.is_saving_in_progress())
    ):
      self._finish()
    if due:  # not into a workdir removed meanwhile (orbax would recreate it silently)
      check_intact(self.manager, self.workdir, step)
      save(self.manager, step, state, force=preempted, config=self.config)
      self._saving = step
    if self._saving and (preempted or last):
      self._finish()

  def close(self) -> None:
    """Waits for every save, then closes the manager."""
    self.manager.wait_until_finished()
    self.manager.close()

  def check_intact(self, step: int) -> None:
    """`check_intact` of this run."""
    check_intact(self.manager, self.workdir, step)

  def _finish(self) -> None:
    finish(self.manager, self._saving)
    self.on_saved(self._saving, self.manager.directory)
    self._saving = None


def _removed(path, step: int) -> str:
  return (
    f"{path} was removed while the run was going: step {step} is not saved; restore it and "
    "restart the same command to resume, or restart the same command to train again from step 0"
  )


# The OS errors behind a failed save, as tensorstore and orbax word them deep in their messages.
_OS_REASONS = (
  "No space left on device",
  "Disk quota exceeded",
  "Read-only file system",
  "Permission denied",
  "No such file or directory",
)


def _storage_error(mngr, step: int, e: Exception) -> StorageError:
  if not epath.Path(mngr.directory).exists():  # removed while the save was being written
    return StorageError(_removed(mngr.directory, step))
  reason = next((r for r in _OS_REASONS if r in str(e)), None) or _reason(e)[:300]
  good = [s for s in _finished_steps(mngr.directory) if s != step]
  return StorageError(
    f"checkpoint of step {step} in {mngr.directory} failed ({reason}); newest good "
    f"checkpoint: {f'step {max(good)}' if good else 'none'}; fix the storage and restart the "
    "same command to continue from it"
  )


def _finished_steps(directory) -> list[int]:
  try:
    return [int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit()]
  except OSError:
    return []


def _move_aside(directory: epath.Path, name: str) -> epath.Path:
  broken = directory.parent / BROKEN_DIR
  if jax.process_index() == 0:
    broken.mkdir(parents=True, exist_ok=True)
  dst, i = broken / name, 1
  while dst.exists():
    dst, i = broken / f"{name}.{i}", i + 1
  if jax.process_index() == 0:
    try:
      (directory / name).rename(dst)
    except FileNotFoundError:
      if "://" not in str(directory):
        raise
      _move_objects(directory / name, dst)
  return dst


def _move_objects(src: epath.Path, dst: epath.Path) -> None:
  """Moves a folder of an object store: each object copied, then the folder removed. (A folder
  there is only a name prefix: etils.epath's fsspec backend refuses to rename into a folder that
  holds no object yet, such as a new `checkpoints.broken/`.)"""
  key = lambda path: str(path).split("://", 1)[-1]  # fsspec's walk drops the gs:// of its roots
  for root, _, files in src.walk():
    relative = key(root)[len(key(src)) :].strip("/")
    for name in files:
      (src / relative / name).copy(dst / relative / name)
  src.rmtree()


def tidy(directory) -> None:
  """Warns about stray entries of a checkpoint directory and moves empty step folders aside.

  An empty step folder (not written by orbax, which renames a finished temporary folder) would
  otherwise count as the latest checkpoint. Removes the temporary folders of saves that did not
  complete (`*.orbax-checkpoint-tmp`); raises StorageError if a local directory is not writable.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return
  if jax.process_index() == 0:
    _check_writable(directory)
  moved = False
  for entry in sorted(directory.iterdir(), key=lambda p: p.name):
    if ".orbax-checkpoint-tmp" in entry.name:  # a save that never completed
      if jax.process_index() == 0:
        if entry.is_dir():
          entry.rmtree()
        else:
          entry.unlink()
        logging.warning("Removed %s: a checkpoint save that did not complete", entry)
      moved = True
      continue
    if entry.name.isdigit():
      if entry.is_dir() and not any(entry.iterdir()):
        dst = _move_aside(directory, entry.name)
        logging.warning(
          "Ignoring empty checkpoint folder %s (not a checkpoint): moved to %s", entry, dst
        )
        moved = True
    else:
      logging.warning(
        "Ignoring %s: not a checkpoint (checkpoint folders are named by their step)", entry
      )
  if moved:
    _sync("pf_jax_tidy_checkpoints")


def _check_writable(directory: epath.Path) -> None:
  if "://" in str(directory):
    return
  probe = directory / f".write_test.{os.getpid()}"
  try:
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise StorageError(
      f"{directory} is not writable ({e.strerror}): checkpoints cannot be saved; fix its "
      "permissions or free space, then restart the same command"
    ) from None


def _reason(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _newest_restorable(mngr: ocp.CheckpointManager, restore: Callable[[int], Any]):
  """(step, restored, failed) for the newest step that `restore(step)` reads; `failed` lists the
  newer (step, reason) pairs that raised. CheckpointError when steps exist and none restores;
  (None, None, []) when there are none."""
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, restore(step), failed
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
      failed.append((step, _reason(e)))
      _drop_failed_reads()
  if failed:
    step, reason = failed[0]
    raise CheckpointError(
      f"no checkpoint in {mngr.directory} can be restored; the latest, step {step}, "
      f"fails with {reason}"
    )
  return None, None, failed


def restore_latest(mngr: ocp.CheckpointManager, target: Any):
  """(step, state) of the newest checkpoint that restores into `target`, or (None, None).

  Newer checkpoints that fail are moved aside with a one-line warning each. If none restores,
  nothing is moved (a code or config change, not corruption, is the likely cause) and
  CheckpointError says why the newest one failed.
  """
  step, state, failed = _newest_restorable(
    mngr, lambda s: mngr.restore(s, args=ocp.args.StandardRestore(target))
  )
  if step is None:
    return None, None
  for bad, reason in failed:
    dst = _move_aside(epath.Path(mngr.directory), str(bad))
    logging.warning(
      "Checkpoint of step %d in %s cannot be restored (%s): moved to %s; resuming from step %d",
      bad,
      mngr.directory,
      reason,
      dst,
      step,
    )
  if failed:
    _sync("pf_jax_checkpoint_fallback")
    mngr.reload()
  _warn_device_count(mngr, step)
  return step, state


def _drop_failed_reads() -> None:
  """Collects orbax's failed read tasks now, without asyncio's traceback per array in the log."""
  asyncio_logger = py_logging.getLogger("asyncio")
  disabled, asyncio_logger.disabled = asyncio_logger.disabled, True
  try:
    gc.collect()
  finally:
    asyncio_logger.disabled = disabled


def _warn_device_count(mngr: ocp.CheckpointManager, step: int) -> None:
  try:
    saved = (mngr.metadata(step).custom_metadata or {}).get("num_devices")
  except Exception:  # pylint: disable=broad-except  (metadata is optional)
    saved = None
  if saved and saved != jax.device_count():
    logging.warning(
      "Resuming a run saved on %d devices on %d devices: results will differ from an "
      "uninterrupted run at float-rounding level",
      saved,
      jax.device_count(),
    )


def find_checkpoints(path) -> epath.Path:
  """The checkpoint directory of a workdir (its `checkpoints/`) or the directory itself."""
  path = as_path(path)
  return path / "checkpoints" if (path / "checkpoints").exists() else path


def restore_arrays(path, sharding) -> Any:
  """(tree, step) of the newest checkpoint under `path` that restores, every array placed with
  `sharding`; a newer one that does not is skipped with a one-line warning (nothing is moved).

  The target comes from the checkpoint's metadata (shapes and dtypes only), so a checkpoint saved
  on any device count restores onto the current devices.
  """
  directory = find_checkpoints(path)

  def restore(step):
    meta = mngr.item_metadata(step)
    meta = getattr(meta, "tree", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    return mngr.restore(step, args=ocp.args.StandardRestore(target))

  with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as mngr:
    step, tree, failed = _newest_restorable(mngr, restore)
  if step is None:
    raise CheckpointError(f"no checkpoint in {str(directory)!r}")
  for bad, reason in failed:
    logging.warning(
      "Checkpoint of step %d in %s cannot be restored (%s): using step %d",
      bad,
      directory,
      reason,
      step,
    )
  return tree, step


def load_variables(path) -> tuple[Any, Any, int]:
  """The model variables of the latest checkpoint of a workdir (or checkpoint directory).

  Args:
    path: a workdir or its `checkpoints/` directory (any `etils.epath` path).

  Returns:
    (params, batch_stats ({} without BatchNorm), step): raw arrays on one local device, whatever
    device count the checkpoint was saved on.
  """
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored, step = restore_arrays(path, sharding)
  return restored["params"], restored.get("batch_stats", {}), step
