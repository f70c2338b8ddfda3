"""Criteo display-ads (Kaggle) TSV with the ALPT paper's preprocessing.

Lines: `label, I1..I13, C1..C26`, tab-separated, empty = missing (the test
file has no label). Numeric `x` becomes the token `floor(ln(x)^2)` for
`x > 2`, else `int(x)`; then every field follows the vocabulary rules of
`CTRPipeline` (missing its own id, values seen fewer than `min_count` times
in training one OOV id per field). Criteo's data cannot be redistributed:
point `path` at your own copy.
"""

import math

from alpt_keras.models.pipeline import CTRPipeline, MalformedLine

# What `float()` accepts from a Criteo integer column, in the serving graph
# (decimal numbers with an optional exponent; no spaces, no inf/nan).
NUMBER_PATTERN = r"[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?"

NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))


def bucketize(value):
    """The paper's numeric transform: `floor(ln(x)^2)` if `x > 2` else
    `int(x)`, as a token string.

    >>> [bucketize(v) for v in (0.0, 2.0, 3.0, 100.0, -1.0)]
    ['0', '2', '1', '21', '-1']
    """
    if value > 2:
        return str(int(math.floor(math.log(value) ** 2)))
    return str(int(value))


class CriteoPipeline(CTRPipeline):
    """`CTRPipeline` for Criteo TSV files; see `CTRPipeline` for arguments.

    Example:

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "train.txt")
    >>> row = "1\\t" + "\\t".join(["5"] * 13 + ["a"] * 26)
    >>> _ = open(path, "w").write(row + "\\n" + row + "\\n")
    >>> pipeline = CriteoPipeline(path, split=(1, 0, 0)).fit()
    >>> pipeline.vocabulary_sizes()["C1"]
    3
    """

    field_names = NUMERIC + CATEGORICAL
    # The columns a raw-feature export takes (`models.RawFeatures`).
    raw_columns = NUMERIC + CATEGORICAL

    def raw_values(self, columns):
        return columns[1:] if self.labeled else columns

    @staticmethod
    def graph_tokens(raw):
        """`parse` + `bucketize` in TensorFlow, for serving: dict column ->
        string `[N]` (as in the file, `""` = missing) to dict field ->
        token string (`""` = missing). Integer columns are binned in
        float64 like `bucketize`; a value `float()` would refuse, or a
        non-finite one, fails with `InvalidArgumentError` naming the
        column."""
        import tensorflow as tf

        from alpt_keras.table import fail_check

        tokens = {}
        for name in NUMERIC:
            text = raw[name]
            present = tf.not_equal(text, "")
            parses = tf.logical_or(tf.logical_not(present),
                                   tf.strings.regex_full_match(
                                       text, NUMBER_PATTERN))
            bad = tf.logical_not(parses)
            check = fail_check([
                f"Criteo column {name} must be a number or empty. "
                "Received (first 10):", tf.boolean_mask(text, bad)[:10]],
                condition=tf.reduce_all(parses))
            with tf.control_dependencies([check]):
                value = tf.strings.to_number(tf.where(present, text, "0"),
                                             tf.float64)
            finite = tf.logical_or(tf.logical_not(present),
                                   tf.math.is_finite(value))
            check = fail_check([
                f"Criteo column {name} must be finite. Received (first "
                "10):", tf.boolean_mask(text, tf.logical_not(finite))[:10]],
                condition=tf.reduce_all(finite))
            with tf.control_dependencies([check]):
                large = value > 2
                log = tf.math.log(tf.where(large, value, 3.0))
                binned = tf.where(large, tf.floor(log * log), value)
            # int(): truncation toward zero, as a cast does.
            token = tf.strings.as_string(tf.cast(binned, tf.int64))
            tokens[name] = tf.where(present, token, "")
        for name in CATEGORICAL:
            tokens[name] = raw[name]
        return tokens

    def parse(self, line):
        columns = line.split("\t")
        expected = 40 if self.labeled else 39
        if len(columns) != expected:
            raise MalformedLine(
                f"expected {expected} tab-separated columns, "
                f"found {len(columns)}")
        label = None
        if self.labeled:
            label = columns[0]
            if label not in ("0", "1"):
                raise MalformedLine(f"label must be 0 or 1, found {label!r}")
            label, columns = float(label), columns[1:]
        tokens = []
        for name, raw in zip(NUMERIC, columns[:13], strict=True):
            if raw == "":
                tokens.append(None)
                continue
            try:
                value = float(raw)
            except ValueError:
                raise MalformedLine(
                    f"{name} must be a number, found {raw!r}") from None
            if not math.isfinite(value):
                raise MalformedLine(f"{name} must be finite, found {raw!r}")
            tokens.append(bucketize(value))
        tokens.extend(raw if raw != "" else None for raw in columns[13:])
        return label, tokens
