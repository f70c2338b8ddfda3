"""Native CPU kernels for the training step (issue 15).

`alpt_kernels.cc` ships in the package and is compiled on first use with
the installed TensorFlow's own flags (`tf.sysconfig.get_compile_flags()`,
`get_link_flags()`) into a per-user cache, keyed by the TensorFlow
version, the compiler and the source, then loaded with
`tf.load_op_library`. The build is atomic: concurrent first uses take a
file lock, compile to a temporary name and rename, so no process loads a
half-written library.

Which path runs:

- `ALPTOptimizer(kernels=...)`: `"auto"` (the default) defers to the
  environment variable `ALPT_KERNELS`; `"native"` requires the kernels
  (a failed build is an error); `"stock"` never uses them.
- `ALPT_KERNELS`: `auto` (default: the kernels when they build, else one
  warning and the stock ops), `native` or `stock`.

The kernels compute bit for bit what the stock ops they replace compute
(`tests/core/test_kernels.py`). They run on CPU, in training steps only,
never under ParameterServerStrategy (the ps tasks never load the library)
nor for GPU tables; exported SavedModels never contain them.
"""

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import uuid
import warnings

import tensorflow as tf

MODES = ("auto", "native", "stock")
ENV = "ALPT_KERNELS"
CACHE_ENV = "ALPT_KERNEL_CACHE"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "alpt_kernels.cc")
# No -march=native: the library behaves the same on every CPU that runs
# the installed TensorFlow. -ffp-contract=off keeps a*b+c from becoming a
# fused multiply-add; without -ffast-math nothing is reordered, so -O3's
# vectorised loops give the scalar IEEE results bit for bit.
# -fno-trapping-math only lets selects be vectorised (values unchanged:
# it concerns floating-point exception flags, which nothing reads). On
# x86-64, -mavx: TensorFlow's own wheels require AVX, and it vectorises
# floor (AVX alone has no FMA).
FLAGS = ["-std=c++17", "-shared", "-fPIC", "-O3", "-ffp-contract=off",
         "-fno-trapping-math", "-w"] + (
             ["-mavx"] if platform.machine().lower() in ("x86_64", "amd64")
             else [])

_lock = threading.Lock()
_loaded = {}  # "library" -> module, or "error" -> str


def check_mode(mode, argument="kernels"):
    if mode not in MODES:
        raise ValueError(f"`{argument}` must be one of {MODES}. "
                         f"Received: {argument}={mode!r}")
    return mode


def env_mode():
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(
            f"The environment variable {ENV} must be one of {MODES}. "
            f"Received: {ENV}={os.environ[ENV]!r}")
    return mode


def resolve(mode):
    """The effective mode of an optimizer's `kernels` argument."""
    check_mode(mode)
    return env_mode() if mode == "auto" else mode


def cache_dir():
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alpt_keras", "kernels")


def compiler():
    """The C++ compiler: `$CXX`, else `g++`, else `c++` (None if none)."""
    for name in ([os.environ["CXX"]] if os.environ.get("CXX")
                 else ["g++", "c++"]):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compiler_id(cxx):
    proc = subprocess.run([cxx, "--version"], capture_output=True,
                          text=True, timeout=60, check=False)
    return proc.stdout.splitlines()[0] if proc.stdout else cxx


def library_path(cxx):
    """Where the library for this TensorFlow, compiler and source lives."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([
        source, tf.__version__.encode(), _compiler_id(cxx).encode(),
        " ".join(FLAGS + tf.sysconfig.get_compile_flags()
                 + tf.sysconfig.get_link_flags()).encode()])).hexdigest()
    return os.path.join(cache_dir(), f"alpt_kernels-{key[:16]}.so")


def build():
    """Compiles the library if the cache does not hold it; returns its
    path. Raises `RuntimeError` (with the compiler's message) on failure."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(
            "no C++ compiler found (set CXX, or install g++)")
    path = library_path(cxx)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time
        if os.path.exists(path):  # another process built it meanwhile
            return path
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        command = ([cxx] + FLAGS + [SOURCE, "-o", tmp]
                   + tf.sysconfig.get_compile_flags()
                   + tf.sysconfig.get_link_flags())
        try:
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=900, check=False)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"building {os.path.basename(SOURCE)} failed "
                    f"({' '.join(command[:2])} ...):\n{proc.stderr[-2000:]}")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return path


@tf.autograph.experimental.do_not_convert  # called while steps trace
def load(mode="auto"):
    """The op library, or `None` for the stock path.

    `mode` (`MODES`) as resolved by `resolve`: `"stock"` gives `None`;
    `"native"` raises if the library cannot be built or loaded; `"auto"`
    warns once and gives `None`.
    """
    mode = resolve(mode)
    if mode == "stock":
        return None
    with _lock:
        if "library" not in _loaded and "error" not in _loaded:
            try:
                _loaded["library"] = tf.load_op_library(build())
                # Training lookups carry their gradient through the
                # layer's custom gradient, never through this op.
                tf.no_gradient("AlptGatherDequantize")
            except (RuntimeError, OSError, subprocess.SubprocessError,
                    tf.errors.OpError) as error:
                _loaded["error"] = str(error)
                if mode == "auto":
                    warnings.warn(
                        "alpt_keras: native kernels unavailable, using "
                        f"stock TensorFlow ops ({error}). Set {ENV}=stock "
                        "to silence this.", RuntimeWarning, stacklevel=3)
        if "library" in _loaded:
            return _loaded["library"]
    if mode == "native":
        raise RuntimeError(
            "alpt_keras native kernels were required (kernels='native' or "
            f"{ENV}=native) but are unavailable: {_loaded['error']}")
    return None


def usable_here(strategy):
    """Whether kernels may run under `strategy`: CPU tables (no GPU
    visible), and not ParameterServerStrategy (its ps tasks never load
    the library)."""
    if tf.config.list_logical_devices("GPU"):
        return False
    return "ParameterServer" not in type(strategy).__name__


def unique_segment_sum(library, ids, values):
    """`(unique_ids, positions, sums)`: bitwise `tf.unique(ids)` and
    `tf.math.unsorted_segment_sum(values, positions, U)` on CPU."""
    return library.alpt_unique_segment_sum(ids, values)


def fused_step_supported(table, config, two_pass):
    """Whether `AlptTableStep` runs `table`'s whole update: per-row Δ
    (learned by any step-size rule in a one-pass step, or fixed), any
    table optimizer, int8 or packed codes. A per-table Δ and a two-pass
    step that learns Δ take the stock ops (the same math, more passes);
    so do sharded or remote variables (`fused_table_step` gives `None`)."""
    spec = table.spec
    if not spec.per_row or (spec.learn_step_size and two_pass):
        return False
    return table.storage.kind in ("int8", "packed")


def _components(strategy, variable):
    """The per-device `tf.Variable`s behind `variable` (one, or one per
    replica of a mirrored variable); `None` if any is not a plain
    resource variable (sharded, or remote)."""
    from alpt_keras import _keras  # noqa: PLC0415 (import cycle)
    variable = _keras.tf_variable(variable)
    parts = strategy.experimental_local_results(variable)
    if not all(hasattr(p, "handle") and not hasattr(p, "variables")
               for p in parts):
        return None
    return list(parts)


def fused_table_step(library, strategy, table, slots, unique_ids, grads,
                     step, apply, config, step_size_hyper):
    """The ops that run `table`'s one-pass step on rows `unique_ids` with
    summed gradients `grads` in place (one per replica's copy), or `None`
    when its variables are not local (then the stock ops run).

    Bitwise `update.table_step` + the stock scatters: the same IEEE
    operations in the same order, with the column reductions in the
    documented order (`alpt_keras.update.step`). `apply` (bool scalar):
    where false, nothing is written."""
    from alpt_keras import quantizers  # noqa: PLC0415 (import cycle)
    from alpt_keras.update.table_spec import as_group  # noqa: PLC0415
    group = as_group(table.spec)
    table_rule = config.table_rule
    step_rule = config.step_size_rule if group.learn_step_size else None
    variables = [table.storage.variable, table.step_sizes]
    variables += [slots[s.name] for s in table_rule.slots]
    if step_rule is not None:
        variables += [slots[s.name] for s in step_rule.slots]
    parts = [_components(strategy, v) for v in variables]
    if any(p is None for p in parts) or len({len(p) for p in parts}) != 1:
        return None
    keys = quantizers.hash_key(
        tf.constant([t.seed for t in group.tables], tf.int64),
        tf.constant([t.salt for t in group.tables], tf.int64), step)
    t = tf.cast(step + 1, tf.float32)  # update.step._step_number

    def constants(hyper):
        # Python floats become float32 exactly as in the stock ops' graph
        # (`1.0 - beta` is a Python subtraction there too); the bias
        # corrections are the same graph ops as `update.rules`'.
        return [tf.constant(hyper.learning_rate, tf.float32),
                tf.constant(hyper.epsilon, tf.float32),
                tf.constant(hyper.beta_1, tf.float32),
                tf.constant(1.0 - hyper.beta_1, tf.float32),
                tf.constant(hyper.beta_2, tf.float32),
                tf.constant(1.0 - hyper.beta_2, tf.float32),
                1.0 - tf.pow(hyper.beta_1, t),
                1.0 - tf.pow(hyper.beta_2, t)]

    hyper = tf.stack(
        constants(config.embedding_hyperparameters)
        + constants(step_size_hyper)
        + [tf.constant(quantizers.lsq_gradient_scale(
            group.output_dim, group.num_bits), tf.float32),
           tf.constant(group.min_step_size, tf.float32)])
    offsets = tf.constant(group.offsets, tf.int64)
    num_table_slots = len(table_rule.slots)
    ops = []
    for replica in zip(*parts, strict=True):
        with tf.device(replica[0].device):
            ops.append(library.alpt_table_step(
                codes=replica[0].handle, step_sizes=replica[1].handle,
                table_state=[r.handle for r in
                             replica[2:2 + num_table_slots]],
                step_size_state=[r.handle for r in
                                 replica[2 + num_table_slots:]],
                ids=unique_ids, grads=grads, offsets=offsets, keys=keys,
                hyper=hyper, apply=apply, table_rule=table_rule.name,
                step_size_rule="none" if step_rule is None
                else step_rule.name,
                num_bits=group.num_bits,
                packed=table.storage.kind == "packed",
                stochastic=group.rounding == "stochastic"))
    return ops


def forward_library(table):
    """The op library for `table`'s training lookup, or `None` (stock
    ops): the mode of the `ALPTOptimizer` that claimed the table (else
    the environment's), CPU tables, not under ParameterServerStrategy."""
    owner = table.claimed_by() if table.claimed_by is not None else None
    mode = owner.kernels if owner is not None else "auto"
    if resolve(mode) == "stock" or not usable_here(
            tf.distribute.get_strategy()):
        return None
    return load(mode)


def gather_dequantize(library, table, ids):
    """`Δ·ŵ` float32 `[N, D]` of checked global ids `[N]` in one pass
    (`AlptGatherDequantize`), or `None` where it does not apply (a
    per-table Δ of several logical tables, sharded variables, a mirrored
    variable read outside a replica); then the stock ops run. Bitwise
    `dequantize(read_rows(ids), read_step_sizes(ids))`."""
    from alpt_keras import _keras  # noqa: PLC0415 (import cycle)
    from alpt_keras.update.table_spec import as_group  # noqa: PLC0415
    group = as_group(table.spec)
    if not group.per_row and group.num_tables > 1:
        return None
    codes = _keras.tf_variable(table.storage.variable)
    steps = _keras.tf_variable(table.step_sizes)
    if hasattr(codes, "variables") or hasattr(steps, "variables"):
        return None  # sharded
    try:
        handles = codes.handle, steps.handle
    except ValueError:  # a mirrored variable outside a replica context
        return None
    return library.alpt_gather_dequantize(
        handles[0], handles[1], ids, num_bits=group.num_bits,
        output_dim=group.output_dim,
        packed=table.storage.kind == "packed", per_row=group.per_row)
