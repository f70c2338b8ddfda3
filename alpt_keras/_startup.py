"""Quiet TensorFlow start-up for the command-line tools.

Importing TensorFlow 2.21 prints about ten lines on stderr before Python
can do anything about them: absl's "All log messages before
absl::InitializeLog()" notice, oneDNN, "Could not find cuda drivers" and
the CPU-feature banner, twice (two native libraries each start their own
logging), and the first device listing adds "failed call to cuInit". Some
of them ignore `TF_CPP_MIN_LOG_LEVEL`. The tools (`alpt-train`,
`alpt-export`, `alpt-evaluate`) therefore import TensorFlow and list the
devices with the process's stderr (file descriptor 2) redirected to a
temporary file; what was caught is kept in `captured()`, printed again by
`--verbose`, and printed at once if the import fails. Outside the tools
(`import alpt_keras` in a user's program) nothing is redirected.

Pure Python, no TensorFlow import at module level: `alpt_keras/__init__`
runs `quiet_tensorflow_import()` before anything imports TensorFlow.
"""

import contextlib
import os
import sys
import tempfile

# The console scripts this package installs (setup.py entry points), and
# the modules `python -m` runs them as.
TOOLS = ("alpt-train", "alpt-export", "alpt-evaluate")
TOOL_MODULES = ("alpt_keras.cli", "alpt_keras.export.cli",
                "alpt_keras.cli.evaluate")

_captured = []


def is_tool():
    """True when this process is one of the `TOOLS`."""
    if os.path.basename(sys.argv[0] if sys.argv else "") in TOOLS:
        return True
    argv = getattr(sys, "orig_argv", [])  # python [options] -m module ...
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] in TOOL_MODULES


def captured():
    """Everything redirected so far, as text."""
    return "".join(_captured)


@contextlib.contextmanager
def quiet_stderr():
    """Redirects file descriptor 2 (C++ logs and Python's `sys.stderr`) to
    a temporary file for the block and keeps what was written in
    `captured()`. If the block raises, the caught text is printed first,
    so an import failure still shows TensorFlow's own explanation."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            _captured.append(text)
            if failed:
                sys.stderr.write(text)


def quiet_tensorflow_import():
    """In a command-line tool, imports TensorFlow quietly: C++ logs below
    ERROR are off from then on (unless `TF_CPP_MIN_LOG_LEVEL` is set), and
    the import's own lines are caught. Does nothing elsewhere, or when
    TensorFlow is already imported."""
    if not is_tool() or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():
        import tensorflow  # noqa: F401


def list_devices_quietly():
    """Initialises TensorFlow's devices, in a tool with stderr caught (the
    first listing logs "failed call to cuInit" on machines without a
    GPU). Callers that configure logical devices first do this
    themselves."""
    import tensorflow as tf

    with quiet_stderr() if is_tool() else contextlib.nullcontext():
        tf.config.list_physical_devices("GPU")
