"""`alpt-train`'s output directory: one run at a time, one run per
directory, and no half-written file under a final name.

- `lock`: an exclusive `flock` on `<dir>/.alpt-train.lock`, released by the
  OS when the process dies (so a killed run never leaves a stale lock).
- `check_fingerprint`: `<dir>/run.json` records everything that decides
  the result; a rerun with other settings is refused instead of resuming.
- `atomic_file`: write to a temporary name in the same directory (keeping
  the suffix Keras checks: `.keras`, `.weights.h5`), fsync, rename.
- `EpochHistory`: every finished epoch's logs and seconds in
  `<dir>/history.json`, so the report of a resumed run holds all epochs.
- `fault_point`: the test suite's way to kill a run at a precise phase.
"""

import contextlib
import json
import os
import signal
import time
import uuid

LOCK_FILE = ".alpt-train.lock"
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"
# Flags that do not change what a run computes: raising --epochs continues
# training; the others only change logging, outputs or the NaN stop.
NOT_FINGERPRINTED = frozenset({
    "epochs", "verbose", "tensorboard", "export_dir", "model_name",
    "output_dir", "max_skipped_steps"})
FAULT_ENV = "ALPT_TRAIN_FAULT"

_held_locks = []  # open lock files, kept for the life of the process


class OutputDirError(Exception):
    """A run that may not use this output directory (exit status 2)."""


def fault_point(name):
    """Kills this process with SIGKILL if `$ALPT_TRAIN_FAULT` is `name`
    (fault-injection tests: a kill at an exact phase, no sleeps)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def lock(directory):
    """Takes the exclusive lock of `directory` for this process's life;
    raises `OutputDirError` if another process holds it."""
    import fcntl

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise OutputDirError(
            f"--output-dir {directory} is in use by another alpt-train "
            f"(pid {holder}); wait for it to finish or choose another "
            "--output-dir.") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held_locks.append(f)


def fingerprint(args, keras_flavour):
    """The settings that decide a run's result, as a JSON-able dict."""
    settings = {k: v for k, v in sorted(vars(args).items())
                if k not in NOT_FINGERPRINTED}
    settings["keras"] = keras_flavour
    if getattr(args, "data_path", None):
        stat = os.stat(args.data_path)
        settings["data_file"] = {"size": stat.st_size,
                                 "mtime_ns": stat.st_mtime_ns}
    return json.loads(json.dumps(settings))


def check_fingerprint(directory, settings, record=True):
    """In a directory that holds a run already, raises `OutputDirError`
    naming the settings that differ; in a new one, records `settings`
    (if `record`)."""
    path = os.path.join(directory, RUN_FILE)
    if not os.path.exists(path):
        if record:
            write_json(path, settings)
        return
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f)
    differ = sorted(k for k in set(recorded) | set(settings)
                    if recorded.get(k) != settings.get(k))
    if differ:
        shown = ", ".join(
            f"{_flag(k)} {_show(recorded.get(k))} (there) vs "
            f"{_show(settings.get(k))} (now)" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise OutputDirError(
            f"--output-dir {directory} holds a run with other settings: "
            f"{shown}{more}. Rerun with its settings to resume it, or use "
            f"a new --output-dir (or delete {directory}) to start fresh.")


def _flag(key):
    return {"keras": "Keras flavour", "data_file": "data file"}.get(
        key, "--" + key.replace("_", "-"))


def _show(value):
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return json.dumps(value) if isinstance(value, dict) else str(value)


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path in `path`'s directory whose name ends like
    `path` (Keras checks `.keras` / `.weights.h5`); after the body, fsyncs
    it and renames it to `path`. An exception removes it: `path` is
    always the old file or the whole new one."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{name}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, value):
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def read_history(directory):
    """Epoch index (str) -> {"logs": {...}, "seconds": float}."""
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def merged_history(directory, epochs):
    """The logs of epochs `0..epochs-1` as Keras's `history.history`
    (metric -> list) and their total training seconds."""
    entries = read_history(directory)
    history, seconds = {}, 0.0
    for epoch in range(epochs):
        entry = entries.get(str(epoch))
        if entry is None:
            continue
        seconds += entry["seconds"]
        for key, value in entry["logs"].items():
            history.setdefault(key, []).append(value)
    return history, seconds


def epoch_history_callback(directory, keras):
    """A callback that records each finished epoch in `history.json`
    (atomically, before the epoch's backup is written)."""

    class EpochHistory(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            entries = read_history(directory)
            entries[str(epoch)] = {
                "logs": {k: float(v) for k, v in (logs or {}).items()},
                "seconds": time.perf_counter() - self._start}
            write_json(os.path.join(directory, HISTORY_FILE), entries)

    return EpochHistory()


def backup_callback(backup, keras, is_keras_3):
    """`BackupAndRestore` into `backup` that keeps its state until `main`
    removes it, and whose every write is atomic.

    tf_keras backs up through a `tf.train.CheckpointManager`, which writes
    its state file atomically after the checkpoint: used as is. Keras 3
    writes `latest.weights.h5` and `training_metadata.json` in place, so a
    kill mid-write leaves a file that fails every rerun, and a kill between
    the two pairs the new weights with the old epoch. Here each epoch's
    weights go to their own file (`epoch-<E>.weights.h5`, written
    atomically) and only then does the metadata, also atomic, point to it:
    whenever the process dies, the metadata names a whole file of the epoch
    it records.
    """
    if not is_keras_3:
        return keras.callbacks.BackupAndRestore(backup,
                                                delete_checkpoint=False)

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        def _load_model(self):
            metadata = _read_metadata(self._training_metadata_path)
            if metadata is None or "weights" not in metadata:
                return super()._load_model()  # none yet, or Keras's own
            optimizer = self.model.optimizer
            if optimizer is not None and not optimizer.built:
                optimizer.build(self.model.trainable_variables)
            from alpt_keras import load_weights  # all or nothing

            load_weights(self.model,
                         os.path.join(self.backup_dir, metadata["weights"]))
            self.model._initial_epoch = metadata["epoch"]

        def _save_model(self):
            os.makedirs(self.backup_dir, exist_ok=True)
            name = f"epoch-{self._current_epoch}.weights.h5"
            with atomic_file(os.path.join(self.backup_dir, name)) as tmp:
                self.model.save_weights(tmp)
            fault_point("backup_written")
            write_json(self._training_metadata_path,
                       {"epoch": self._current_epoch, "weights": name})
            for old in os.listdir(self.backup_dir):
                if old.endswith(".weights.h5") and old != name:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(self.backup_dir, old))

    return AtomicBackupAndRestore(backup, delete_checkpoint=False)


def _read_metadata(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_temporaries(directory):
    """Removes the temporary files of killed atomic writes (only call with
    the directory's lock held: a live writer's file would go too)."""
    for folder in (directory, os.path.join(directory, "backup")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.startswith(".tmp-") and os.path.isfile(path):
                with contextlib.suppress(OSError):
                    os.remove(path)
