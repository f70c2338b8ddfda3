"""`ALPTEmbedding`: an embedding table stored as low-bit integer codes."""

import zlib

import numpy as np
import tensorflow as tf

from alpt_keras import _keras, kernels, quantizers, update
from alpt_keras.sharding import row_variables
from alpt_keras.storage import (
    SUPPORTED_STORAGE,
    make_storage,
    pack_codes,
    unpack_codes,
    words_per_row,
)
from alpt_keras.table import (
    SUPPORTED_COMBINERS,
    SUPPORTED_STEP_SIZE,
    TAG_ATTRIBUTE,
    TableState,
    check_float_dtype,
    checked_ids,
    combine,
    sparse_bags,
)
from alpt_keras.two_pass import in_step_size_pass
from alpt_keras.update import GroupSpec, TableSpec
from alpt_keras.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
)

keras = _keras.keras

_INIT_BLOCK_ROWS = 1 << 16  # rows quantized at once when building


def _crc32(text):
    return zlib.crc32(text.encode("utf-8"))


def _multi_worker():
    """Whether variables are being created for a multi-worker
    `MultiWorkerMirroredStrategy`."""
    if not tf.distribute.has_strategy():
        return False
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    tasks = strategy.cluster_resolver.cluster_spec().as_dict()
    return len(tasks.get("worker", [])) + len(tasks.get("chief", [])) > 1


class _StorageConvertingStore:
    """A read-only view of a Keras weights store that converts codes saved
    with the other storage (see `PhysicalTable.load_own_variables`)."""

    def __init__(self, store, layer):
        self._store = store
        self._layer = layer

    def keys(self):
        return self._store.keys()

    def __len__(self):
        return len(self._store.keys())

    def __getitem__(self, key):
        return self._layer._convert_codes(self._store[key])


class _Membership:
    """Where a stacked `ALPTEmbedding`'s rows live: a plain object, so
    neither Keras flavour tracks the group as the layer's sublayer."""

    def __init__(self, group, index):
        self.group = group
        self.index = index


def quantize_table(spec, storage, table, step, rounding):
    """Stored codes (int8 or packed, per `storage`) of a whole float table
    of the logical table `spec`, in blocks of rows: the noise and float
    temporaries of one block, not of the table, bound the peak memory (a
    2^22 x 16 table would otherwise need GBs of transients). Bitwise the
    same as one pass: every code depends only on its own weight, Δ and
    (row, column) noise."""
    parts = []
    for start in range(0, spec.input_dim, _INIT_BLOCK_ROWS):
        stop = min(start + _INIT_BLOCK_ROWS, spec.input_dim)
        block_step = step[start:stop] if spec.per_row else step
        # The pure step's write-back, at the initial codes' noise step.
        codes = update.requantize(table[start:stop], block_step,
                                  tf.range(start, stop, dtype=tf.int64),
                                  quantizers.INIT_STEP, spec, rounding)
        if storage == "packed":
            parts.append(pack_codes(codes, spec.num_bits))
        else:
            parts.append(tf.cast(codes, tf.int8))
    return tf.concat(parts, axis=0)


def initial_state(spec, initializer, storage):
    """The initial `(codes, step_sizes)` of the logical table `spec`: its
    float table `w0 = initializer([V, D])`, the LSQ initial Δ of `w0`
    (`[V, 1]` or `[1, 1]`) and the codes of `w0` with the table's
    rounding. Eager, even when Keras builds inside a scratch graph."""
    with tf.init_scope():
        w0 = tf.cast(initializer((spec.input_dim, spec.output_dim),
                                 "float32"), tf.float32)
        step0 = quantizers.lsq_initial_step_size(
            w0, spec.num_bits, per_row=spec.per_row,
            minimum=spec.min_step_size)
        return quantize_table(spec, storage, w0, step0, spec.rounding), step0


def check_loaded_table(name, spec, storage, codes, step_sizes):
    """Refuses loaded values that no training could have produced: codes
    outside `spec.num_bits`' range (int8 storage; every packed bit pattern
    is a code in range) and step sizes that are not finite and > 0."""
    codes = np.asarray(codes)
    if storage == "int8" and codes.size:
        low, high = quantizers.code_range(spec.num_bits)
        if codes.min() < low or codes.max() > high:
            outside = int(np.sum((codes < low) | (codes > high)))
            raise ValueError(
                f"Cannot load table '{name}': its {spec.num_bits}-bit codes "
                f"must be in [{low}, {high}]. Received: {outside} codes "
                f"outside, in [{codes.min()}, {codes.max()}] (a file saved "
                "with more bits?)")
    steps = np.asarray(step_sizes, np.float64)
    bad = ~(np.isfinite(steps) & (steps > 0))
    if bad.any():
        raise ValueError(
            f"Cannot load table '{name}': its step sizes must be finite "
            f"and > 0. Received: {int(bad.sum())} that are not, e.g. "
            f"{steps[bad].ravel()[:3].tolist()}")


def check_storage_for_strategy(storage, name):
    if storage == "int8" and _multi_worker():
        raise ValueError(
            f"ALPT table '{name}': MultiWorkerMirroredStrategy "
            "creates variables with collective broadcasts, which refuse "
            "int8. Use `storage='packed'` (int32 words). Received: "
            "storage='int8' under a multi-worker strategy"
        )


class PhysicalTable(keras.layers.Layer):
    """The variables and the lookup shared by `ALPTEmbedding` (one logical
    table) and `ALPTEmbeddingGroup` (several, stacked): codes `[ΣV, ...]`,
    Δ (`[ΣV, 1]` per row, `[T, 1]` per table) and the gradient carrier.
    Not a public layer: subclasses decide what a call takes."""

    def _create_table(self, group, storage, codes0, step0):
        # Never AutoCastVariables (either flavour): under a mixed policy
        # the rows are dequantized in float32 and cast to the compute dtype
        # once, and the optimizer steps float32 Δ (tf_keras used to read Δ
        # as bfloat16 inside `call`: "Input 'y' of 'Mul' Op has type
        # bfloat16 that does not match type float32").
        extra = {"autocast": False}
        # Keep this order stable: checkpoints store layer weights by
        # position. Row-indexed variables are marked for `RowPartitioner`
        # (sharding over parameter servers); the carrier never is.
        with row_variables(group.input_dim):
            self.codes = self.add_weight(
                name="codes",
                shape=tuple(codes0.shape),
                dtype=codes0.dtype.name,
                initializer=lambda shape, dtype=None: codes0,
                trainable=False,
                aggregation=_keras.weight_aggregation(),
                **extra,
            )
            self.step_sizes = self.add_weight(
                name="step_sizes",
                shape=tuple(step0.shape),
                dtype="float32",
                initializer=lambda shape, dtype=None: step0,
                trainable=False,
                aggregation=_keras.weight_aggregation(),
                **extra,
            )
        # A one-element trainable variable through which the row gradient
        # travels, as `tf.IndexedSlices`, to `ALPTOptimizer` (an integer
        # variable never receives a gradient from the tape).
        self.gradient_carrier = self.add_weight(
            name="gradient_carrier",
            shape=(1,),
            dtype="float32",
            initializer="zeros",
            trainable=True,
            **extra,
        )
        self._table = TableState(
            spec=group,
            storage=make_storage(storage, self.codes, group.num_bits,
                                 group.output_dim),
            step_sizes=self.step_sizes,
            layer=self,
        )
        setattr(self.gradient_carrier, TAG_ATTRIBUTE, self._table)

    def _lookup(self, ids, training, table_index=None):
        """Dequantized rows `[N, D]` of global ids `[N]` (checked), whose
        gradient flows to the carrier. `table_index` `[N]` gives each id's
        logical table (needed for a per-table Δ in a group of several).

        `training=False` (predict, serving) is a plain lookup; otherwise
        the rows carry their sparse gradient, and a `training=True` pass
        insists on an ALPTOptimizer (gradients taken for inspection need
        none).
        """
        table = self._table
        rows = None
        if training is True or in_step_size_pass():
            # A training step on CPU: one native pass when available
            # (`alpt_keras.kernels`), bitwise the stock lookup below.
            library = kernels.forward_library(table)
            if library is not None:
                rows = kernels.gather_dequantize(library, table, ids)
        if rows is None:
            step_sizes = table.read_step_sizes(ids)
            if table_index is not None and not table.spec.per_row:
                step_sizes = tf.gather(step_sizes, table_index)
            rows = quantizers.dequantize(
                table.storage.read_rows_float(ids), step_sizes)
        if training is False and not in_step_size_pass():
            # Inference (predict, serving): plain dequantized lookup, no
            # gradient plumbing, so exports capture only codes and Δ.
            return tf.cast(rows, self.compute_dtype)
        dense_shape = tf.constant(
            [table.spec.input_dim, table.spec.output_dim], dtype=tf.int64
        )

        @tf.custom_gradient
        def attach(carrier, rows):
            def grad(upstream):
                if training is True:
                    table.check_optimizer()
                row_grads = tf.IndexedSlices(
                    tf.cast(upstream, tf.float32), ids, dense_shape
                )
                return row_grads, None

            return tf.identity(rows), grad

        carrier = tf.identity(_keras.tf_variable(self.gradient_carrier))
        rows = attach(carrier, rows)
        if rows.dtype != self.compute_dtype:
            rows = tf.cast(rows, self.compute_dtype)
        return rows

    # ------------------------------------------------------------ checkpoint
    def load_own_variables(self, store):
        """Loads `.keras` / `.weights.h5` state saved with either storage:
        int8 codes are packed, packed codes unpacked, on the fly. Every
        value is checked before any variable is assigned (shapes, codes
        within `num_bits`, Δ finite and > 0): a refused file leaves the
        layer as it was."""
        self._ensure_built()
        converting = _StorageConvertingStore(store, self)
        variables = [self.gradient_carrier, self.codes, self.step_sizes]
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' expected {len(variables)} variables "
                "(gradient carrier, codes, step sizes), but received "
                f"{len(store.keys())} variables during loading.")
        values = {str(i): np.asarray(converting[str(i)])
                  for i in range(len(variables))}
        for i, variable in enumerate(variables):
            want = tuple(variable.shape)
            if values[str(i)].shape != want:
                raise ValueError(
                    f"Cannot load table '{self.name}': its variable "
                    f"'{variable.name}' has shape {want}. Received: shape "
                    f"{values[str(i)].shape}")
        check_loaded_table(self.name, self._table.spec, self.storage,
                           values["1"], values["2"])
        super().load_own_variables(values)

    def _convert_codes(self, value, spec=None):
        """`value` (a stored variable) in this layer's codes format, or
        `value` unchanged when it is not codes of the other storage.
        `spec`: the table the codes belong to (defaults to the layer's
        whole physical table)."""
        spec = self._table.spec if spec is None else spec
        array = np.asarray(value)
        shape = (spec.input_dim, spec.output_dim)
        words = (spec.input_dim, words_per_row(spec.output_dim,
                                               spec.num_bits))
        if self.storage == "packed" and array.dtype == np.int8 and \
                array.shape == shape:
            low, high = quantizers.code_range(spec.num_bits)
            if array.min(initial=0) < low or array.max(initial=0) > high:
                raise ValueError(
                    f"Cannot load int8 codes into the {spec.num_bits}-bit "
                    f"packed layer '{self.name}': codes must be in "
                    f"[{low}, {high}]. Received: codes in "
                    f"[{array.min()}, {array.max()}]"
                )
            return pack_codes(array, spec.num_bits).numpy()
        if self.storage == "int8" and array.dtype == np.int32 and \
                array.shape == words:
            codes = unpack_codes(array, spec.num_bits, spec.output_dim)
            return tf.cast(codes, tf.int8).numpy()
        return value

    def _ensure_built(self):
        if self._table is None:
            self.build(None)


@_keras.register
class ALPTEmbedding(PhysicalTable):
    """Embedding table trained in low precision with a learned step size.

    The table is kept as integer codes `ŵ` in `[-2^(b-1), 2^(b-1) - 1]` plus a
    step size `Δ` (one per row, or one per table). A lookup returns the
    dequantized rows `Δ_i · ŵ_i`. The gradient of those rows reaches
    `alpt_keras.ALPTOptimizer` as a sparse `tf.IndexedSlices` (straight-through
    estimation); the optimizer updates the touched rows in full precision,
    learns `Δ` with the LSQ gradient and writes the rows back with stochastic
    rounding (ALPT). With `learn_step_size=False` the step size stays at its
    LSQ initial value (LPT).

    Ids must lie in `[0, input_dim)`; anything else is an error raised before
    any state changes. Inputs may be dense `[B]` or `[B, F]` (output
    `[B, D]` or `[B, F, D]`), or ragged/sparse multi-hot ids reduced with a
    `combiner` (a sparse `[B, N]` row's bag is its stored values, wherever
    they stand). The layer does not run under XLA (`supports_jit = False`);
    asked to, it raises a clear error.

    Args:
        input_dim: int. Number of rows `V` (the vocabulary size).
        output_dim: int. Row width `D`.
        num_bits: int in [2, 8]. Bits per code. Defaults to `8`.
        step_size: `"row"` (one Δ per row) or `"table"` (one Δ shared by
            the table). Defaults to `"row"`. Read back as `step_size_mode`
            (the Δ variable itself is `step_sizes`).
        rounding: `"stochastic"` or `"deterministic"` (round half up), used
            for the initial codes and every write-back. Defaults to
            `"stochastic"`.
        learn_step_size: bool. `True` learns Δ (ALPT); `False` keeps it at
            the LSQ initial value (LPT). Defaults to `True`.
        embeddings_initializer: initializer of the float table `w0` that the
            initial codes quantize. Defaults to `RandomNormal(0, 0.003)`
            seeded with `seed`.
        seed: int or `None`. Seeds the default initializer and the rounding
            noise (`None` uses noise seed 0). Defaults to `None`.
        combiner: `None`, `"sum"`, `"mean"` or `"sqrtn"`. Reduces the last
            id axis (multi-hot features). Defaults to `None`.
        min_step_size: float > 0. Lower bound kept on Δ. Defaults to `1e-8`.
        noise_salt: int or `None`. Distinguishes the noise of this table from
            other tables'. Defaults to the CRC32 of `name` when a name is
            given, else of `seed`, else of the automatic layer name (which
            depends on how many layers the process built: name your tables
            for runs that must reproduce across processes).
        storage: `"int8"` (one int8 per code, a `[V, D]` variable) or
            `"packed"` (codes bit-packed into int32 words, a
            `[V, ceil(D·b/32)]` variable: 8-bit codes take 1 byte, 4-bit
            1/2, 2-bit 1/4; required under MultiWorkerMirroredStrategy,
            whose collectives refuse int8). Both give identical codes for the
            same seed, and `.keras`/`.weights.h5` files load into either.
            Defaults to `"int8"`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Example:

    >>> layer = ALPTEmbedding(input_dim=10, output_dim=4, num_bits=8, seed=1)
    >>> layer(tf.constant([[1, 2], [3, 4]])).shape
    TensorShape([2, 2, 4])
    >>> tf.as_dtype(layer.codes.dtype).name
    'int8'

    References:
        - Li et al., "Learning Accurate Low-bit Embeddings for CTR
          Prediction via Adaptive Low-Precision Training", AAAI 2023.
        - Esser et al., "Learned Step Size Quantization", ICLR 2020.
    """

    def __init__(
        self,
        input_dim,
        output_dim,
        num_bits=8,
        step_size="row",
        rounding="stochastic",
        learn_step_size=True,
        embeddings_initializer=None,
        seed=None,
        combiner=None,
        min_step_size=1e-8,
        noise_salt=None,
        storage="int8",
        **kwargs,
    ):
        explicit_name = kwargs.get("name")
        super().__init__(**kwargs)
        check_float_dtype(self)
        self.input_dim = check_int("input_dim", input_dim, minimum=1)
        self.output_dim = check_int("output_dim", output_dim, minimum=1)
        self.num_bits = quantizers.validate_num_bits(num_bits)
        self.step_size_mode = check_choice("step_size", step_size,
                                           SUPPORTED_STEP_SIZE)
        self.rounding = check_choice("rounding", rounding,
                                     quantizers.SUPPORTED_ROUNDING)
        self.learn_step_size = check_bool("learn_step_size", learn_step_size)
        self.seed = check_int("seed", seed, allow_none=True)
        self.combiner = check_choice("combiner", combiner,
                                     (None,) + SUPPORTED_COMBINERS)
        self.min_step_size = check_float("min_step_size", min_step_size,
                                         minimum=0.0, inclusive=False)
        self.storage = check_choice("storage", storage, SUPPORTED_STORAGE)
        if embeddings_initializer is None:
            embeddings_initializer = keras.initializers.RandomNormal(
                mean=0.0, stddev=0.003, seed=self.seed
            )
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer
        )
        if noise_salt is None:
            if explicit_name:
                noise_salt = _crc32(explicit_name)
            elif self.seed is not None:
                noise_salt = _crc32(f"seed:{self.seed}")
            else:
                noise_salt = _crc32(self.name)
        else:
            noise_salt = check_int("noise_salt", noise_salt)
        self.noise_salt = int(noise_salt) & 0xFFFFFFFF
        # Keras 3: keep `jit_compile="auto"` from turning XLA on for models
        # containing this layer (unique, scatter and asserts are not XLA-safe).
        self.supports_jit = False
        self._table = None
        # (group, index) when this table is stacked in an
        # `ALPTEmbeddingGroup` (`stack_into`): it then owns no variables.
        self._member = None

    @property
    def table_spec(self):
        """`alpt_keras.update.TableSpec` of this table (no variables)."""
        return TableSpec(
            name=self.name,
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            num_bits=self.num_bits,
            step_size_mode=self.step_size_mode,
            rounding=self.rounding,
            learn_step_size=self.learn_step_size,
            seed=0 if self.seed is None else self.seed,
            salt=self.noise_salt,
            min_step_size=self.min_step_size,
        )

    def build(self, input_shape=None):
        if self._member is not None:
            self.built = True  # the group holds the variables
            return
        if self._table is not None:
            return
        check_storage_for_strategy(self.storage, self.name)
        spec = self.table_spec
        codes0, step0 = initial_state(spec, self.embeddings_initializer,
                                      self.storage)
        # A group of one: `ALPTEmbeddingGroup` runs the same code.
        self._create_table(GroupSpec((spec,), name=self.name), self.storage,
                           codes0, step0)
        self.built = True

    # ------------------------------------------------------------- stacking
    def stack_into(self, group):
        """Makes this (unbuilt) layer the view of its logical table in
        `group`, an `ALPTEmbeddingGroup` built from it: the layer then
        owns no variables, is not called (the group is), and saves and
        loads its table's rows of the group's variables under its own
        path, in the format of a separate table. So `.keras` and
        `.weights.h5` files move between stacked and separate models
        (what `models.FeatureEmbedding` relies on)."""
        if self._table is not None:
            raise ValueError(
                f"ALPTEmbedding '{self.name}' is built and owns variables; "
                "only an unbuilt layer can be stacked. Received: a built "
                "layer")
        self._member = _Membership(group, group.table_names.index(self.name))

    @property
    def stacked_in(self):
        """The `ALPTEmbeddingGroup` holding this table, or `None`."""
        return None if self._member is None else self._member.group

    def _member_rows(self):
        group, index = self._member.group, self._member.index
        group._ensure_built()
        return group, index, group.offsets[index], group.offsets[index + 1]

    def save_own_variables(self, store):
        if self._member is None:
            return super().save_own_variables(store)
        group, index, _, _ = self._member_rows()
        _, codes, steps = group._table.logical_values()[index]
        # The order of a separate table: carrier, codes, step sizes.
        store["0"] = np.zeros((1,), np.float32)
        store["1"] = np.asarray(codes)
        store["2"] = np.asarray(steps)

    def _load_member(self, store):
        group, index, start, stop = self._member_rows()
        if len(store.keys()) != 3:
            raise ValueError(
                f"Layer '{self.name}' expected 3 variables (gradient "
                "carrier, codes, step sizes), but received "
                f"{len(store.keys())} variables during loading.")
        spec = self.table_spec
        codes = np.asarray(self._convert_codes(store["1"], spec))
        steps = np.asarray(store["2"])
        variable = group._table.codes
        dtype = tf.as_dtype(variable.dtype)
        want_codes = (stop - start,) + tuple(variable.shape[1:])
        want_steps = (stop - start, 1) if spec.per_row else (1, 1)
        if codes.shape != want_codes or codes.dtype != dtype.as_numpy_dtype:
            raise ValueError(
                f"Cannot load table '{self.name}': its codes must have shape "
                f"{want_codes} and dtype {dtype.name}. Received: shape "
                f"{codes.shape}, dtype {codes.dtype}")
        if steps.shape != want_steps:
            raise ValueError(
                f"Cannot load table '{self.name}': its step sizes must have "
                f"shape {want_steps}. Received: shape {steps.shape}")
        check_loaded_table(self.name, spec, self.storage, codes, steps)
        rows = tf.range(start, stop, dtype=tf.int64)
        _keras.tf_variable(group.codes).scatter_update(
            tf.IndexedSlices(tf.constant(codes), rows))
        step_rows = rows if spec.per_row else tf.constant([index], tf.int64)
        _keras.tf_variable(group.step_sizes).scatter_update(
            tf.IndexedSlices(tf.constant(steps, tf.float32), step_rows))

    def load_own_variables(self, store):
        if self._member is None:
            return super().load_own_variables(store)
        return self._load_member(store)

    # ------------------------------------------------------------------- call
    def call(self, inputs, training=None):
        _keras.refuse_xla(f"ALPTEmbedding '{self.name}'")
        if self._member is not None:
            raise ValueError(
                f"ALPTEmbedding '{self.name}' is stacked in the "
                f"ALPTEmbeddingGroup '{self._member.group.name}': call the "
                "group. Received: a call of the stacked table")
        if isinstance(inputs, tf.SparseTensor):
            inputs = sparse_bags(inputs)
        if isinstance(inputs, tf.RaggedTensor):
            ids = self._to_ids(inputs.flat_values)
            rows = self._lookup(ids, training)  # (N, D)
            embedded = inputs.with_flat_values(rows)  # (B, ..., (L), D)
            if self.combiner is None:
                return embedded
            counts = tf.reduce_sum(
                tf.ones_like(inputs, dtype=rows.dtype), axis=-1
            )[..., None]
            return self._combine(tf.reduce_sum(embedded, axis=-2), counts)
        inputs = tf.convert_to_tensor(inputs)
        ids = self._to_ids(tf.reshape(inputs, [-1]))
        out_shape = tf.concat(
            [tf.shape(inputs, out_type=tf.int32), [self.output_dim]], axis=0
        )
        embedded = tf.reshape(self._lookup(ids, training), out_shape)
        if self.combiner is None:
            return embedded
        if inputs.shape.rank is not None and inputs.shape.rank < 1:
            raise ValueError(
                "A `combiner` reduces the last id axis, so ids need rank >= 1."
                f" Received: ids of shape {inputs.shape}"
            )
        counts = tf.cast(tf.shape(inputs)[-1], embedded.dtype)
        return self._combine(tf.reduce_sum(embedded, axis=-2), counts)

    def _combine(self, sums, counts):
        return combine(sums, counts, self.combiner)

    def _to_ids(self, flat):
        """int64 ids, checked against `[0, input_dim)` before any use."""
        return checked_ids(flat, self.input_dim, self.name)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if self.combiner is not None:
            input_shape = input_shape[:-1]
        return _keras.output_shape(input_shape + (self.output_dim,))

    # ------------------------------------------------------- float interface
    def unpacked_codes(self):
        """The codes as an int8 tensor `[input_dim, output_dim]`, whatever
        the storage."""
        if self._member is not None:
            return self._member.group.unpacked_codes(self.name)
        self._ensure_built()
        return tf.cast(self._table.storage.read_all(), tf.int8)

    def dequantized_table(self):
        """The float32 table `Δ · ŵ`, shape `[input_dim, output_dim]`."""
        if self._member is not None:
            return self._member.group.dequantized_table(self.name)
        self._ensure_built()
        return quantizers.dequantize(
            self._table.storage.read_all(),
            tf.convert_to_tensor(self.step_sizes),
        )

    def set_float_table(self, table, rounding="deterministic"):
        """Warm start: quantizes a float table into codes and step sizes.

        The step sizes follow the LSQ rule `2 · mean|w| / sqrt(Q_P)` (per row
        or per table) computed from `table`.

        Args:
            table: array-like float `[input_dim, output_dim]`, e.g. the
                weights of a trained `keras.layers.Embedding`.
            rounding: `"deterministic"` (round half up; the default, the
                closest codes) or `"stochastic"`.
        """
        if self._member is not None:
            raise NotImplementedError(
                f"ALPTEmbedding '{self.name}' is stacked in a group; warm "
                "start the table before stacking it (or use separate "
                "tables). Received: set_float_table on a stacked table")
        self._ensure_built()
        table = np.asarray(table, dtype=np.float32)
        expected = (self.input_dim, self.output_dim)
        if table.shape != expected:
            raise ValueError(
                f"`table` must have shape {expected}. "
                f"Received: table of shape {table.shape}"
            )
        if not np.all(np.isfinite(table)):
            raise ValueError(
                "`table` must be finite. Received: a table with "
                f"{int(np.sum(~np.isfinite(table)))} NaN/Inf entries"
            )
        if rounding not in quantizers.SUPPORTED_ROUNDING:
            raise ValueError(
                f"`rounding` must be one of {quantizers.SUPPORTED_ROUNDING}. "
                f"Received: rounding={rounding!r}"
            )
        step = quantizers.lsq_initial_step_size(
            table,
            self.num_bits,
            per_row=self.step_size_mode == "row",
            minimum=self.min_step_size,
        )
        codes = quantize_table(self.table_spec, self.storage,
                               tf.constant(table), step, rounding)
        self.step_sizes.assign(step)
        self.codes.assign(codes)

    @classmethod
    def from_embedding(cls, embedding, **kwargs):
        """A new `ALPTEmbedding` warm-started from a float embedding layer.

        Args:
            embedding: a built `keras.layers.Embedding` (or any layer with an
                `embeddings` variable of shape `[V, D]`).
            **kwargs: other `ALPTEmbedding` arguments (`num_bits`, ...).
        """
        weights = getattr(embedding, "embeddings", None)
        if weights is None:
            raise ValueError(
                "`embedding` must be a built layer with an `embeddings` "
                f"variable. Received: {embedding!r}"
            )
        table = np.asarray(weights.numpy(), dtype=np.float32)
        layer = cls(input_dim=table.shape[0], output_dim=table.shape[1],
                    **kwargs)
        layer.set_float_table(table)
        return layer

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                "num_bits": self.num_bits,
                "step_size": self.step_size_mode,
                "rounding": self.rounding,
                "learn_step_size": self.learn_step_size,
                "embeddings_initializer": keras.initializers.serialize(
                    self.embeddings_initializer
                ),
                "seed": self.seed,
                "combiner": self.combiner,
                "min_step_size": self.min_step_size,
                "noise_salt": self.noise_salt,
                "storage": self.storage,
            }
        )
        return config
