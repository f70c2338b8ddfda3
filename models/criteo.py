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
