"""Streaming pipeline for line-oriented CTR files (Criteo, Avazu, ...).

Two passes over the file, never holding it in memory:
1. `fit()` counts every field's tokens on the training split only and
   builds the vocabularies: id 0 = out-of-vocabulary (values seen fewer than
   `min_count` times in training, or never), id 1 = missing, then the kept
   values by decreasing count (ties by value), so ids are reproducible.
2. `batches()` / `dataset()` encode one split chunk by chunk.

Rows go to train/validation/test by a hash of `(seed, line number)`
(default 8:1:1), reproducible without shuffling the file. Malformed lines
are skipped, counted and reported with their line numbers (`report`), or
raise `ValueError` in strict mode. With `hash_buckets`, fields skip the
vocabulary and hash tokens into a fixed number of ids (unbounded id spaces)
with `tf.strings.to_hash_bucket_fast`, a stock op that a serving graph runs
too (`models.RawFeatures`).
"""

import gzip
import json
import os
import zlib

import numpy as np

from alpt_keras.validation import check_int

SPLITS = ("train", "validation", "test")
# How hashed fields (`hash_buckets`) turn tokens into ids; recorded in
# saved vocabularies.
HASH = "tf.strings.to_hash_bucket_fast"
OOV_ID, MISSING_ID, FIRST_VALUE_ID = 0, 1, 2


class MalformedLine(ValueError):
    """A line that does not parse; the message says why."""


class EmptyDataError(ValueError):
    """A data file without a single good data line."""


def open_text(path):
    """`path` as UTF-8 text lines: gzip files (by their magic bytes, so
    also without a `.gz` suffix) are decompressed on the fly, a UTF-8 byte
    order mark is dropped, and undecodable bytes become U+FFFD (that line
    then fails to parse and is reported as malformed)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def _new_report():
    return {"lines": 0, "malformed": 0, "malformed_examples": [],
            "rows": {split: 0 for split in SPLITS}}


class CTRPipeline:
    """Base class: subclasses set `field_names` and implement `parse`.

    Args:
        path: str. The data file.
        min_count: int >= 1. Values seen fewer times in training are OOV.
            Defaults to `2` (the paper's setting).
        split: three non-negative weights for train/validation/test.
            Defaults to `(8, 1, 1)`.
        seed: int. Seeds the split. Defaults to `0`.
        strict: bool. Raise on the first malformed line instead of skipping
            it. Defaults to `False`.
        hash_buckets: `None`, or an int: hash every field into that many
            value ids (plus OOV and missing) instead of a vocabulary.
        labeled: bool. `False` for files without labels (prediction only).
    """

    field_names = ()
    chunk_lines = 65_536

    def __init__(self, path, min_count=2, split=(8, 1, 1), seed=0,
                 strict=False, hash_buckets=None, labeled=True):
        if not os.path.exists(path):
            raise ValueError(f"`path` must be an existing file. "
                             f"Received: path={path!r}")
        min_count = check_int("min_count", min_count, minimum=1)
        split = tuple(split)
        if len(split) != 3 or any(w < 0 for w in split) or sum(split) <= 0:
            raise ValueError("`split` must be three non-negative weights "
                             f"with a positive sum. Received: split={split!r}")
        hash_buckets = check_int("hash_buckets", hash_buckets, minimum=1,
                                 allow_none=True)
        self.path, self.min_count, self.seed = path, min_count, seed
        self.split = split
        self.strict, self.hash_buckets, self.labeled = strict, hash_buckets, \
            labeled
        self.vocabularies = None
        self.report = _new_report()

    # ------------------------------------------------------------ parsing
    def parse(self, line):
        """Returns `(label or None, tokens)`, one token (str or None for
        missing) per field; raises `MalformedLine`."""
        raise NotImplementedError

    def _rows(self):
        """Yields `(line_number, split_name, label, tokens)` of good lines."""
        cumulative = np.cumsum(self.split) / sum(self.split)
        self.report = _new_report()
        with open_text(self.path) as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if self._skip_line(number, line):
                    continue
                self.report["lines"] += 1
                try:
                    label, tokens = self.parse(line)
                except MalformedLine as error:
                    self._malformed(number, str(error))
                    continue
                split = self.row_split(number, cumulative)
                self.report["rows"][split] += 1
                yield number, split, label, tokens

    def row_split(self, line_number, _cumulative=None):
        """The split (`"train"`, ...) of a line: a hash of seed and number."""
        cumulative = _cumulative if _cumulative is not None else \
            np.cumsum(self.split) / sum(self.split)
        draw = zlib.crc32(f"{self.seed}:{line_number}".encode()) / 2**32
        return SPLITS[int(np.searchsorted(cumulative, draw, side="right"))]

    def _skip_line(self, number, line):
        """Header lines and the like. Default: skip blank lines."""
        return not line

    def _check_not_empty(self):
        if sum(self.report["rows"].values()) == 0:
            what = "every one of its {} lines is malformed".format(
                self.report["malformed"]) if self.report["malformed"] else \
                "it is empty or holds only a header"
            raise EmptyDataError(
                f"`path` has no data line: {what}. Received: "
                f"path={self.path!r}")

    def _malformed(self, number, reason):
        if self.strict:
            raise ValueError(f"{self.path}, line {number}: {reason}")
        self.report["malformed"] += 1
        if len(self.report["malformed_examples"]) < 20:
            self.report["malformed_examples"].append(
                {"line": number, "reason": reason})

    # -------------------------------------------------------- vocabulary
    def fit(self):
        """Builds the vocabularies from the training split (first pass).

        Raises `EmptyDataError` if the file has no good data line (empty,
        header-only, or every line malformed); `report["rows"]` then gives
        the good lines per split.
        """
        if self.hash_buckets is not None:
            for _ in self._rows():  # still counts malformed lines
                pass
            self._check_not_empty()
            self.vocabularies = {}
            return self
        counts = [dict() for _ in self.field_names]
        for _, split, _, tokens in self._rows():
            if split != "train":
                continue
            for field_counts, token in zip(counts, tokens, strict=True):
                if token is not None:
                    field_counts[token] = field_counts.get(token, 0) + 1
        self._check_not_empty()
        self.vocabularies = {}
        for name, field_counts in zip(self.field_names, counts, strict=True):
            kept = sorted((t for t, c in field_counts.items()
                           if c >= self.min_count),
                          key=lambda t: (-field_counts[t], t))
            self.vocabularies[name] = {
                t: i + FIRST_VALUE_ID for i, t in enumerate(kept)}
        return self

    def vocabulary_sizes(self):
        """Feature name -> number of ids (OOV and missing included)."""
        self._require_fit()
        if self.hash_buckets is not None:
            return {n: self.hash_buckets + FIRST_VALUE_ID
                    for n in self.field_names}
        return {n: len(v) + FIRST_VALUE_ID
                for n, v in self.vocabularies.items()}

    def feature_configs(self, **table_kwargs):
        """One `FeatureConfig` per field, sized from the vocabularies.

        `table_kwargs` go to every `TableConfig` (`kind`, `num_bits`, ...).
        """
        from alpt_keras.models.features import simple_features

        return simple_features(self.vocabulary_sizes(), **table_kwargs)

    def save_vocabulary(self, path):
        """Writes the vocabularies as JSON (token lists in id order)."""
        self._require_fit()
        payload = {
            "pipeline": type(self).__name__, "min_count": self.min_count,
            "hash_buckets": self.hash_buckets, "hash": HASH,
            "oov_id": OOV_ID,
            "missing_id": MISSING_ID,
            "fields": {n: sorted(v, key=v.get)
                       for n, v in self.vocabularies.items()},
        }
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
        os.replace(tmp, path)  # never a half-written vocabulary

    def load_vocabulary(self, path):
        """Reads vocabularies written by `save_vocabulary` (no refit)."""
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if payload.get("pipeline") != type(self).__name__:
            raise ValueError(
                f"{path} holds a vocabulary of {payload.get('pipeline')!r}, "
                f"not {type(self).__name__!r}")
        if payload["hash_buckets"] is not None and \
                payload.get("hash") != HASH:
            raise ValueError(
                f"{path} holds hashed fields from an older alpt_keras that "
                f"hashed with crc32; ids now come from {HASH} (a stock "
                "TensorFlow op, so TF Serving computes them too). Refit the "
                "pipeline and retrain. Received: hash="
                f"{payload.get('hash')!r}")
        self.hash_buckets = payload["hash_buckets"]
        self.vocabularies = {
            n: {t: i + FIRST_VALUE_ID for i, t in enumerate(tokens)}
            for n, tokens in payload["fields"].items()}
        return self

    @classmethod
    def from_vocabulary(cls, path):
        """A pipeline that encodes with the vocabulary saved at `path`
        (`save_vocabulary`), without a data file: for serving and export
        (`models.RawFeatures`), not for reading data."""
        pipeline = cls.__new__(cls)
        CTRPipeline.__init__(pipeline, path)  # checks that `path` exists
        pipeline.path = None
        return pipeline.load_vocabulary(path)

    # ------------------------------------------------- raw serving columns
    # Subclasses that can run in a serving graph set `raw_columns` (the
    # columns of a data line a request carries, named as in the format) and
    # implement `raw_values(columns)` and `graph_tokens(raw)`.
    raw_columns = ()

    def raw_values(self, columns):
        """The `raw_columns` values of a parsed line's columns."""
        raise NotImplementedError

    @staticmethod
    def graph_tokens(raw):
        """`parse` in TensorFlow: dict raw column -> string `[N]` to dict
        field -> token string `[N]` (`""` = missing)."""
        raise NotImplementedError

    def raw_rows(self, split="test", limit=256):
        """The raw columns of the first `limit` good lines of `split`, as
        a request carries them: dict column -> array of strings (what
        `RawFeatures` takes; used for warm-up requests)."""
        cumulative = np.cumsum(self.split) / sum(self.split)
        rows = []
        with open_text(self.path) as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if self._skip_line(number, line):
                    continue
                try:
                    self.parse(line)
                except MalformedLine:
                    continue
                if split != "all" and self.row_split(
                        number, cumulative) != split:
                    continue
                rows.append(self.raw_values(self._columns(line)))
                if len(rows) == limit:
                    break
        return {c: np.array([r[i] for r in rows], dtype=object).astype(str)
                for i, c in enumerate(self.raw_columns)}

    def _columns(self, line):
        """A line's columns (subclasses with another separator override)."""
        return line.split("\t")

    def _require_fit(self):
        if self.vocabularies is None:
            raise ValueError(
                "Call `fit()` (or `load_vocabulary()`) before encoding. "
                "Received: an unfitted pipeline")

    # ---------------------------------------------------------- encoding
    def encode_token(self, field_index, token):
        if token is None:
            return MISSING_ID
        if self.hash_buckets is not None:
            return int(self._hash([self.field_names[field_index]],
                                  [[token]])[0, 0])
        vocabulary = self.vocabularies[self.field_names[field_index]]
        return vocabulary.get(token, OOV_ID)

    def _hash(self, names, columns):
        """Ids of hashed tokens: `FIRST_VALUE_ID +
        tf.strings.to_hash_bucket_fast(f"{field}\\x1f{token}", buckets)`
        (FarmHash Fingerprint64), the op a serving graph runs too.
        `columns[i]` holds the tokens of field `names[i]` (no `None`);
        returns int64 `[len(columns[0]), len(names)]`."""
        import tensorflow as tf

        keys = np.char.add(np.array([f"{n}\x1f" for n in names])[None, :],
                           np.asarray(columns, dtype=object).T.astype(str))
        return FIRST_VALUE_ID + tf.strings.to_hash_bucket_fast(
            keys, self.hash_buckets).numpy()

    def batches(self, split="train", batch_size=65_536):
        """Yields `(features, labels)`: dict name -> int64 `[n]`, float32
        `[n]` (labels `None` for unlabeled files), streaming the file."""
        self._require_fit()
        if split not in SPLITS and split != "all":
            raise ValueError(f"`split` must be one of {SPLITS + ('all',)}. "
                             f"Received: split={split!r}")
        ids, labels = [], []
        hashed = self.hash_buckets is not None
        for _, row_split, label, tokens in self._rows():
            if split != "all" and row_split != split:
                continue
            # Hashed fields: the tokens, hashed a batch at a time.
            ids.append(tokens if hashed else [
                self.encode_token(i, t) for i, t in enumerate(tokens)])
            labels.append(label)
            if len(ids) == batch_size:
                yield self._pack(ids, labels)
                ids, labels = [], []
        if ids:
            yield self._pack(ids, labels)

    def _pack(self, ids, labels):
        if self.hash_buckets is not None:  # rows of tokens
            missing = np.array([[t is None for t in row] for row in ids])
            tokens = [[t or "" for t in row] for row in ids]
            hashed = self._hash(self.field_names, list(map(list, zip(
                *tokens, strict=True))))
            ids = np.where(missing, MISSING_ID, hashed)
        matrix = np.asarray(ids, dtype=np.int64)
        features = {n: matrix[:, i] for i, n in enumerate(self.field_names)}
        if not self.labeled:
            return features, None
        return features, np.asarray(labels, dtype=np.float32)

    def arrays(self, split="train"):
        """One split in memory: `(features, labels)`."""
        parts = list(self.batches(split))
        if not parts:
            empty = {n: np.zeros([0], np.int64) for n in self.field_names}
            return empty, np.zeros([0], np.float32)
        features = {n: np.concatenate([p[0][n] for p in parts])
                    for n in self.field_names}
        labels = None if not self.labeled else np.concatenate(
            [p[1] for p in parts])
        return features, labels

    def dataset(self, split="train", batch_size=1024):
        """A `tf.data.Dataset` of `(features, labels)` batches, streamed."""
        import tensorflow as tf

        if not self.labeled:
            raise ValueError(
                f"{self.path} has no labels: it can be used for prediction "
                "(`batches`), not for training or evaluation.")
        signature = (
            {n: tf.TensorSpec([None], tf.int64) for n in self.field_names},
            tf.TensorSpec([None], tf.float32))
        dataset = tf.data.Dataset.from_generator(
            lambda: self.batches(split, batch_size),
            output_signature=signature)
        rows = self.report["rows"][split]
        if rows:
            # Counted by `fit`: Keras then knows the epoch's length (no
            # "Your input ran out of data" warning, a progress bar with a
            # total), and a file changed since `fit` fails loudly.
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(
                -(-rows // batch_size)))
        return dataset
