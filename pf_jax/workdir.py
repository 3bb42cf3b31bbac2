"""Human-readable files a run keeps in its workdir, beside `checkpoints/` and the events.

- `config.json`: the resolved config of the run (written at its start);
- `results.json`: the final evaluation of a finished run (`{"step": N, "eval/<set>/top1": ...}`);
- `lock.json`: who is running in the workdir (`WorkdirLock`), while a run is.

One run per workdir: `check_config` refuses to continue a run with a config that differs in
anything but `SAFE_TO_CHANGE`. The directory itself: `check_writable` before a run creates it
(one-line WorkdirError), `remove_if_unused` after a start that stopped before writing anything.

Paths go through `etils.epath`, so `gs://` workdirs work like local ones.
"""

import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from pf_jax import config_fields
from pf_jax.errors import DASH

CONFIG_FILE = "config.json"
# Fields a run may continue with new values (docs/runs-safe.md): they change neither the
# training trajectory nor the meaning of the results. Declared with each field.
SAFE_TO_CHANGE = config_fields.SAFE_TO_CHANGE
# Runs stored before options that can be off became None (or "none") wrote these values for off.
_STORED_OFF = {
  "sam.rho_min": -1.0,
  "sam.obf_alpha": -1.0,
  "sam.asam": "",
  "num_train_steps": -1,
  "warmup_steps": -1,
  "clip_grad_norm": 0.0,
  "shrink_perturb": 0.0,
  "init_from": "",
  "analysis.dataset": "",
  "analysis.collect_every_steps": 0,
  "eval_image_size": -1,
}
OVERRIDE_FLAG = "--allow_config_change"
RESULTS_FILE = "results.json"


def _write_json(path: epath.Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)  # a reader never sees half a file; replaces an earlier one


def save_config(workdir, config: ml_collections.ConfigDict) -> None:
  _write_json(epath.Path(workdir) / CONFIG_FILE, json.loads(config.to_json_best_effort()))


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a run was started with (lists where the config had tuples).

  Raises FileNotFoundError if there is none, DamagedFileError (one line) if it cannot be read.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a pf_jax workdir?")
  try:
    stored = json.loads(path.read_text())
    if not isinstance(stored, dict):
      raise ValueError(f"a JSON {type(stored).__name__}, not an object")
  except (ValueError, UnicodeDecodeError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DamagedFileError(
      f"{path} is damaged ({reason}): restore it, or delete it (a run is then checked against the "
      "config its checkpoints carry)"
    ) from None
  return ml_collections.ConfigDict(_upgrade(stored))


CHECKPOINT_METADATA = (
  "_CHECKPOINT_METADATA"  # orbax's file per step; checkpointing.save adds the config
)


def checkpoint_config(checkpoint_dir) -> ml_collections.ConfigDict | None:
  """The config stored with the newest checkpoint in `checkpoint_dir` that carries one, or None."""
  directory = epath.Path(checkpoint_dir)
  if not directory.exists():
    return None
  steps = sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name))
  for step in steps:
    try:
      config = json.loads((step / CHECKPOINT_METADATA).read_text())["custom_metadata"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
      continue
    if isinstance(config, dict):
      return ml_collections.ConfigDict(_upgrade(config))
  return None


def config_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as stored with each checkpoint (plain JSON, as in config.json)."""
  return json.loads(config.to_json_best_effort())


def _upgrade(stored: dict[str, Any]) -> dict[str, Any]:
  """A stored config with earlier runs' "off" values (`_STORED_OFF`) read as None / "none"."""
  for name, off in _STORED_OFF.items():
    *groups, leaf = name.split(".")
    holder = stored
    for g in groups:
      holder = holder.get(g, {})
    if leaf in holder and holder[leaf] == off and not isinstance(holder[leaf], bool):
      holder[leaf] = "none" if name == "sam.asam" else None
  return stored


def save_results(workdir, step: int, results: dict[str, float]) -> None:
  _write_json(epath.Path(workdir) / RESULTS_FILE, dict(results, step=int(step)))


def load_results(workdir) -> dict[str, float]:
  path = epath.Path(workdir) / RESULTS_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: has the run in {workdir!r} finished?")
  return json.loads(path.read_text())


class ConfigMismatchError(ValueError):
  """A workdir holds a run whose config differs from the new one."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: a nested config dict keyed by dotted field names."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(
  stored: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> list[str]:
  """One line per field outside SAFE_TO_CHANGE that differs: 'config.f: OLD in this workdir, NEW now'."""
  old = flatten(json.loads(stored.to_json_best_effort()))
  now = flatten(json.loads(new.to_json_best_effort()))  # JSON round trip: tuples == lists
  show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"
  return [
    f"config.{k}: {show(old, k)} in this workdir, {show(now, k)} now"
    for k in sorted(set(old) | set(now))
    if k not in SAFE_TO_CHANGE and old.get(k, ...) != now.get(k, ...)
  ]


def check_config(
  workdir, config: ml_collections.ConfigDict, *, has_run: bool, allow_change: bool = False
) -> None:
  """Refuses (ConfigMismatchError) to continue the run in `workdir` with a different config.

  `has_run`: the workdir holds training progress (a checkpoint); without one nothing can be mixed
  and the stored config is simply replaced. The run's config is the one its newest checkpoint
  carries (config.json for checkpoints written before they carried it), so deleting config.json
  checks nothing less. With `allow_change` the differences are logged and the old config.json is
  kept as config.<N>.json (N = 1, 2, ...).
  """
  if not has_run:
    return
  path = epath.Path(workdir) / CONFIG_FILE
  stored = load_config(workdir) if path.exists() else None  # a damaged one: DamagedFileError
  stored = checkpoint_config(epath.Path(workdir) / "checkpoints") or stored
  if stored is None:
    diffs = [
      f"{workdir} holds checkpoints but neither {CONFIG_FILE} nor a config stored with them: "
      f"restore {CONFIG_FILE}, or pass {OVERRIDE_FLAG} to continue it with this config"
    ]
  else:
    diffs = config_differences(stored, config)
  if not diffs:
    return
  if not allow_change:
    if stored is None:
      raise ConfigMismatchError(diffs[0])
    raise ConfigMismatchError(
      "\n".join(
        diffs
        + [
          f"{workdir} holds a run with another config: use a new --workdir, or pass {OVERRIDE_FLAG} to "
          f"continue it with the new values (safe to change: {', '.join(SAFE_TO_CHANGE)})"
        ]
      )
    )
  if path.exists():
    i = 1
    while (epath.Path(workdir) / f"config.{i}.json").exists():
      i += 1
    path.rename(epath.Path(workdir) / f"config.{i}.json")
  for line in diffs:
    logging.warning("Continuing with a changed config (%s): %s", OVERRIDE_FLAG, line)


# -- The directory: writable before a run creates it, removed if a failed start left it empty. --


def check_writable(workdir: str, create: bool = True) -> None:
  """The workdir is (or can become) a writable directory, created unless `create` is False
  (--check_only); remote (gs://) paths are not checked."""
  if "://" in workdir:
    return
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "is a file" if existing == path else f"is under {existing!r}, which is a file"
    raise WorkdirError(f"--workdir: {workdir!r} {DASH} a directory; it {what}")
  if not create:
    if not os.access(existing, os.W_OK | os.X_OK):
      raise WorkdirError(f"--workdir: {workdir!r} {DASH} a directory that can be written")
    return
  try:  # creating it is what the run does first anyway
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
      f"--workdir: {workdir!r} {DASH} a directory that can be created and written ({e.strerror})"
    ) from None


class WorkdirError(ValueError):
  """One-line error about --workdir."""


def first_missing(workdir: str) -> str | None:
  """The outermost directory of `workdir` that does not exist yet (what a run creates), or None
  (it exists, or it is remote)."""
  if "://" in workdir:
    return None
  path, top = os.path.abspath(workdir), None
  while not os.path.exists(path):
    path, top = os.path.dirname(path), path
  return top


def remove_if_unused(top: str | None, workdir: str) -> None:
  """Removes the directories from `top` (`first_missing`, taken before the run created them) down
  to `workdir` if the run left nothing there but its released lock file."""
  if top is None:
    return
  path = os.path.abspath(workdir)
  try:
    if set(os.listdir(path)) - {LOCK_FILE}:
      return
    if os.path.exists(os.path.join(path, LOCK_FILE)):
      os.remove(os.path.join(path, LOCK_FILE))
    while True:
      os.rmdir(path)  # fails (and stops) on a directory something else wrote into meanwhile
      if path == top:
        return
      path = os.path.dirname(path)
  except OSError:
    return


class WorkdirLockedError(RuntimeError):
  """The workdir is in use by another live process (one-line message naming it)."""


class DamagedFileError(ValueError):
  """A workdir file cannot be read (one-line message naming it and what to do)."""


LOCK_FILE = "lock.json"
# Locks without flock (gs://, other object stores): how often the holder refreshes the lock and
# when a lock that is not refreshed counts as abandoned; object stores other than gs:// (no
# conditional writes through etils.epath): how long a start waits after writing the lock before
# reading it back.
SETTLE_S = 5.0
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0
EXACT_LOCK_PREFIXES = ("gs://",)  # object stores locked by conditional writes


class WorkdirLock:
  """One process per workdir (README "Runs are safe").

  Local paths: an exclusive `flock` on `lock.json`, which the kernel drops when the holder dies,
  so a lock left by a killed process is taken over at once (with a warning naming it).
  gs://: Cloud Storage's conditional writes (google-cloud-storage): `lock.json` is created only if
  absent (ifGenerationMatch=0), refreshed every `HEARTBEAT_S` only if still the generation this
  process wrote, and taken over once not refreshed for `STALE_AFTER_S` (the time its writer put
  in it) by a write conditional on the generation read: of several starts or takers exactly one
  write succeeds. Other object stores and filesystems without `flock`: `lock.json` is written, read
  back after `SETTLE_S` (a concurrent start overwrote it: this one stops), refreshed and taken
  over in the same way, unconditionally. `acquire` raises WorkdirLockedError naming the holder
  (host, pid, start time), OSError (one line) if the storage cannot be reached.

  Example:
    with WorkdirLock("/tmp/run"):
      ...  # a second WorkdirLock("/tmp/run").acquire() raises WorkdirLockedError
  """

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.local = "://" not in str(workdir)
    self.gcs = str(workdir).startswith(EXACT_LOCK_PREFIXES)
    self._gcs_lock = _GcsObject(str(self.path)) if self.gcs else None
    self._generation = None  # gs://: the generation of the lock this process wrote last
    self._mutex = threading.Lock()  # gs://: a refresh and `lost` never interleave
    self._fd = None
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None
    self.info = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
      "token": self._token,
    }

  def _holder(self, info) -> str:
    return (
      f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')} "
      f"(lock {self.path})"
    )

  def _read(self):
    try:
      info = json.loads(self.path.read_text())
    except (OSError, ValueError):  # absent, or being written
      return None
    return info if isinstance(info, dict) else None

  def _refuse(self, info):
    raise WorkdirLockedError(
      f"--workdir: {self.path.parent} is in use by {self._holder(info)}: wait for that run to end, "
      "or use another --workdir"
    )

  def acquire(self) -> "WorkdirLock":
    if self.gcs:
      return self._acquire_gcs()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.local:
      try:
        return self._acquire_flock()
      except OSError as e:  # e.g. ENOLCK on some network filesystems
        logging.warning("No flock on %s (%s): locking by heartbeat", self.path, e.strerror)
    return self._acquire_heartbeat()

  def lost(self) -> str | None:
    """None while this process still holds the lock; else who took it over (a one-line phrase).

    Local: the locked file is no longer `lock.json` (removed, so another start could lock a new
    one). Object stores: `lock.json` names another start (ours went stale and was taken over).
    """
    if self.gcs:
      return self._lost_gcs()
    if self._fd is not None:
      try:
        if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
          return None
      except FileNotFoundError:
        return f"its lock {self.path} was removed"
    elif self._thread is None:
      return None  # not acquired
    else:
      held = self._read()
      if held is None or held.get("token") == self._token:
        return None  # unreadable while being written: taken as still ours
    return f"its lock was taken over by {self._holder(self._read() or {})}"

  def _acquire_flock(self):
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        self._refuse(self._read() or {})
      except BaseException:
        os.close(fd)
        raise
      try:  # the holder may have removed the file between our open and flock: lock the new one
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    left = self._read()
    if left:
      logging.warning("Taking over the lock of %s, which is no longer running", self._holder(left))
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(self.info).encode())
    os.fsync(fd)
    self._fd = fd
    _HELD[_key(self.path.parent)] = self
    return self

  def _acquire_heartbeat(self):
    for _ in range(3):
      held = self._read()
      if held and time.time() - held.get("heartbeat", 0) < STALE_AFTER_S:
        self._refuse(held)
      if held:
        logging.warning(
          "Taking over the lock of %s: not refreshed for %d s", self._holder(held), STALE_AFTER_S
        )
      self._write()
      time.sleep(SETTLE_S)
      mine = self._read()
      if mine and mine.get("token") == self._token:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="pf_jax_lock")
        self._thread.start()
        _HELD[_key(self.path.parent)] = self
        return self
    self._refuse(self._read() or {})

  def _write(self):
    self.path.write_text(json.dumps(dict(self.info, heartbeat=time.time())))

  def _acquire_gcs(self):
    """Exactly one start wins: a create-only write, or a write conditional on the generation of
    the abandoned lock it read (another taker's or a refreshed lock's write changes it)."""
    data = self._gcs_data()
    for _ in range(10):  # each pass ends in a refusal, a win, or a lock changed meanwhile
      generation = self._gcs_lock.write(data, if_generation_match=0)
      if generation is not None:
        break
      held = self._gcs_lock.read()
      if held is None:
        continue  # released since: create it again
      info, read_generation, age = held
      if info.get("token") == self._token:  # our write landed, its response was lost: retried
        generation = read_generation
        break
      if age < STALE_AFTER_S:
        self._refuse(info)
      logging.warning(
        "Taking over the lock of %s: not refreshed for %d s", self._holder(info), int(age)
      )
      generation = self._gcs_lock.write(data, if_generation_match=read_generation)
      if generation is not None:
        break
    else:
      held = self._gcs_lock.read()
      self._refuse(held[0] if held else {})
    self._generation = generation
    self._thread = threading.Thread(target=self._beat_gcs, daemon=True, name="pf_jax_lock")
    self._thread.start()
    _HELD[_key(self.path.parent)] = self
    return self

  def _gcs_data(self) -> str:
    return json.dumps(dict(self.info, heartbeat=time.time()))

  def _beat_gcs(self):
    while not self._stop.wait(HEARTBEAT_S):
      with self._mutex:
        if self._generation is None:
          return
        try:
          generation = self._gcs_lock.write(self._gcs_data(), if_generation_match=self._generation)
          if self._stop.is_set():  # released while this write was in flight: keep it released
            return
          if generation is None:  # not our generation: taken over, unless our own write landed
            held = self._gcs_lock.read()
            if held is None or held[0].get("token") != self._token:
              logging.warning(
                "The workdir lock %s was taken over by %s",
                self.path,
                self._holder(held[0] if held else {}),
              )
              return
            generation = held[1]
          self._generation = generation
        except OSError as e:
          logging.warning("Cannot refresh the workdir lock %s: %s", self.path, e)

  def _lost_gcs(self) -> str | None:
    if self._generation is None:
      return None  # not acquired
    with self._mutex:
      try:
        held = self._gcs_lock.read()
      except OSError as e:
        logging.warning("Cannot read the workdir lock %s: %s", self.path, e)
        return None  # a storage hiccup is not a takeover
      if held is not None and (held[1] == self._generation or held[0].get("token") == self._token):
        return None
    if held is None:
      return f"its lock {self.path} was removed"
    return f"its lock was taken over by {self._holder(held[0])}"

  def _release_gcs(self) -> None:
    self._stop.set()
    got = self._mutex.acquire(timeout=5)  # never hang an exit on a refresh in flight
    generation, self._generation = self._generation, None
    if got:
      self._mutex.release()
    self._thread = None
    try:
      held = self._gcs_lock.read()
      if held is not None and held[1] == generation:  # not another start's lock
        self._gcs_lock.delete(if_generation_match=generation)
    except OSError as e:
      logging.warning("Cannot remove the workdir lock %s: %s", self.path, e)

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S) and self._refresh():
      pass

  def _refresh(self) -> bool:
    """Writes the heartbeat; False, writing nothing, once another start has taken the lock."""
    held = self._read()
    if held is not None and held.get("token") != self._token:
      logging.warning("The workdir lock %s was taken over by %s", self.path, self._holder(held))
      return False
    try:
      self._write()
    except OSError as e:
      logging.warning("Cannot refresh the workdir lock %s: %s", self.path, e)
    return True

  def release(self) -> None:
    """Removes the lock (idempotent; safe from a signal handler's exit path)."""
    _HELD.pop(_key(self.path.parent), None)
    if self.gcs:
      if self._generation is not None:
        self._release_gcs()
      return
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        if os.fstat(fd).st_ino == os.stat(self.path).st_ino:  # not another start's new lock file
          self.path.unlink()  # before unlocking: a waiting opener then re-checks the inode
      except OSError:
        pass
      os.close(fd)
    if self._thread is not None:
      self._stop.set()
      self._thread = None
      held = self._read()
      if held and held.get("token") == self._token:
        try:
          self.path.unlink()
        except OSError:
          pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class _GcsObject:
  """One Cloud Storage object through google-cloud-storage, whose writes and deletes can be
  conditional on the object's generation (etils.epath's cannot). Honours STORAGE_EMULATOR_HOST.
  Failures other than a precondition: OSError, one line."""

  def __init__(self, url: str):
    self.url = url
    self.bucket_name, _, self.name = url[len("gs://") :].partition("/")
    self._bucket = None
    self._exceptions = None

  def _do(self, fn):
    """fn(bucket, exceptions); failures but NotFound and PreconditionFailed: OSError, one line."""
    try:
      if self._bucket is None:
        from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
        from google.cloud import storage  # pylint: disable=g-import-not-at-top

        self._bucket, self._exceptions = storage.Client().bucket(self.bucket_name), exceptions
    except ImportError:
      raise OSError(
        f"{self.url}: a gs:// workdir's lock needs the google-cloud-storage package "
        "(pip install 'pf_jax[train]')"
      ) from None
    except Exception as e:  # pylint: disable=broad-except  (credentials)
      raise OSError(f"{self.url}: {_first_line(e)}") from None
    try:
      return fn(self._bucket, self._exceptions)
    except (self._exceptions.NotFound, self._exceptions.PreconditionFailed):
      raise
    except Exception as e:  # pylint: disable=broad-except  (HTTP, transport, auth)
      raise OSError(f"{self.url}: {_first_line(e)}") from None

  def write(self, data: str, *, if_generation_match: int) -> int | None:
    """The new generation, or None if the object's generation is not `if_generation_match`
    (0: if the object exists)."""

    def write(bucket, exceptions):
      blob = bucket.blob(self.name)
      try:
        blob.upload_from_string(
          data, content_type="application/json", if_generation_match=if_generation_match
        )
      except exceptions.PreconditionFailed:
        return None
      return blob.generation

    return self._do(write)

  def read(self) -> tuple[dict[str, Any], int, float] | None:
    """(content, generation, seconds since it was written), or None. The age is the content's
    `heartbeat` (the writer's clock; fake-gcs-server's `updated` can lag a rewrite), else the
    object's `updated`."""

    def read(bucket, exceptions):
      try:
        blob = bucket.get_blob(self.name)
        if blob is None:
          return None
        data = blob.download_as_bytes(if_generation_match=blob.generation)
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        return None  # removed or rewritten between the two requests: absent for now
      try:
        info = json.loads(data)
      except ValueError:
        info = None
      info = info if isinstance(info, dict) else {}
      written = info.get("heartbeat")
      if not isinstance(written, (int, float)) or isinstance(written, bool):
        written = blob.updated.timestamp() if blob.updated else float("-inf")
      return info, blob.generation, time.time() - written

    return self._do(read)

  def delete(self, *, if_generation_match: int) -> None:
    def delete(bucket, exceptions):
      try:
        bucket.blob(self.name).delete(if_generation_match=if_generation_match)
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        pass  # already gone, or another start's lock now

    self._do(delete)


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


_HELD: dict[str, WorkdirLock] = {}  # workdir -> the lock this process holds on it


def _key(workdir) -> str:
  path = str(workdir)
  return path.rstrip("/") if "://" in path else os.path.realpath(path)


def held_lock(workdir) -> WorkdirLock | None:
  """The WorkdirLock this process holds on `workdir` (main.py takes one; library use none)."""
  return _HELD.get(_key(workdir))
