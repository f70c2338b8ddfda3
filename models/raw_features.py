"""Raw-feature serving: a pipeline's preprocessing as a TensorFlow graph.

`RawFeatures(pipeline)` is a `tf.Module` that maps the raw columns of a
data file, as strings exactly as they appear in it (missing = empty
string), to the model's feature ids, with stock ops only, so that TF
Serving can run it in front of the model (`export_for_serving(...,
preprocessing=RawFeatures(pipeline))`) and a client sends
`{"I1": ["5"], ..., "C26": ["e5ba7672"]}` instead of re-implementing the
pipeline:

- vocabularies are SavedModel assets (one text file per field, tokens in id
  order) read by `tf.lookup.StaticHashTable` + `TextFileInitializer`, not
  constants in the graph (Criteo-size vocabularies would approach the 2 GB
  GraphDef limit); an unseen value gets the OOV id and an empty string the
  missing id, as in training;
- hashed fields (`hash_buckets`) use `tf.strings.to_hash_bucket_fast`, the
  hash the Python pipeline uses too;
- the pipeline's own transforms (Criteo's integer binning, in float64)
  come from the pipeline class (`graph_tokens`), next to its Python twin;
- a value that does not parse (`"abc"` in an integer column) fails the
  request with `InvalidArgumentError` naming the column.
"""

import os
import shutil
import tempfile
import uuid
import weakref

import tensorflow as tf

from alpt_keras.models.pipeline import FIRST_VALUE_ID, MISSING_ID, OOV_ID


class RawFeatures(tf.Module):
    """Raw columns (strings) -> feature ids (int64), in the graph.

    Args:
        pipeline: a fitted `CTRPipeline` (`fit()` or `load_vocabulary()`)
            whose class defines `raw_columns` and `graph_tokens` (Criteo,
            Avazu).

    Example:

    >>> import os, tempfile
    >>> from alpt_keras.models.criteo import CriteoPipeline
    >>> path = os.path.join(tempfile.mkdtemp(), "train.txt")
    >>> row = "1\\t" + "\\t".join(["5"] * 13 + ["a"] * 26)
    >>> _ = open(path, "w").write(row + "\\n" + row + "\\n")
    >>> raw = RawFeatures(CriteoPipeline(path, split=(1, 0, 0)).fit())
    >>> columns = {c: tf.constant(["5", ""]) for c in raw.columns}
    >>> raw(columns)["I1"].numpy().tolist()  # "5" -> bin 2, "" missing
    [2, 1]
    """

    def __init__(self, pipeline):
        super().__init__(name="raw_features")
        columns = getattr(type(pipeline), "raw_columns", None)
        if not columns:
            raise TypeError(
                f"{type(pipeline).__name__} cannot preprocess raw columns "
                "in a serving graph (it defines no `raw_columns`). "
                f"Received: pipeline={type(pipeline).__name__}")
        pipeline._require_fit()
        self.columns = tuple(columns)
        self.field_names = tuple(pipeline.field_names)
        self._graph_tokens = type(pipeline).graph_tokens
        self.hash_buckets = pipeline.hash_buckets
        # The vocabulary files live until this object goes; the SavedModel
        # copies them into its own assets/ folder.
        folder = tempfile.mkdtemp(prefix="alpt-vocabulary-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        self.tables = {}
        if self.hash_buckets is None:
            for name in self.field_names:
                tokens = sorted(pipeline.vocabularies[name],
                                key=pipeline.vocabularies[name].get)
                if not tokens:  # every value is OOV: no table needed
                    continue
                path = os.path.join(folder, f"{name}.vocab")
                with open(path, "w", encoding="utf-8", newline="\n") as f:
                    f.write("".join(t + "\n" for t in tokens))
                self.tables[name] = tf.lookup.StaticHashTable(
                    _VocabularyFile(path, name), default_value=-1)

    @classmethod
    def from_vocabulary(cls, path):
        """`RawFeatures` of the pipeline whose `vocabulary.json` (as
        `alpt-train` writes it) is at `path`; no data file needed."""
        import json

        from alpt_keras.models.avazu import AvazuPipeline
        from alpt_keras.models.criteo import CriteoPipeline

        pipelines = {p.__name__: p for p in (CriteoPipeline, AvazuPipeline)}
        with open(path, encoding="utf-8") as f:
            name = json.load(f).get("pipeline")
        if name not in pipelines:
            raise ValueError(
                f"{path} must be the vocabulary.json of a Criteo or Avazu "
                f"pipeline. Received: pipeline={name!r}")
        return cls(pipelines[name].from_vocabulary(path))

    def input_signature(self):
        """`{column: tf.TensorSpec([None], tf.string, name=column)}`."""
        return {c: tf.TensorSpec([None], tf.string, name=c)
                for c in self.columns}

    def __call__(self, raw):
        """`raw`: dict column -> string `[N]`. Returns dict field -> int64
        ids `[N]`."""
        missing = [c for c in self.columns if c not in raw]
        if missing:
            raise ValueError(f"Missing raw columns: {missing}. Received: "
                             f"{sorted(raw)}")
        raw = {c: tf.convert_to_tensor(raw[c], tf.string)
               for c in self.columns}
        tokens = self._graph_tokens(raw)
        ids = {}
        for name in self.field_names:
            token = tokens[name]
            if self.hash_buckets is not None:
                found = tf.strings.to_hash_bucket_fast(
                    tf.strings.join([f"{name}\x1f", token]),
                    self.hash_buckets) + FIRST_VALUE_ID
            elif name in self.tables:
                index = self.tables[name].lookup(token)
                found = tf.where(index < 0, tf.constant(OOV_ID, tf.int64),
                                 index + FIRST_VALUE_ID)
            else:
                found = tf.fill(tf.shape(token), tf.constant(OOV_ID,
                                                             tf.int64))
            ids[name] = tf.where(tf.equal(token, ""),
                                 tf.constant(MISSING_ID, tf.int64), found)
        return ids


class _VocabularyFile(tf.lookup.TextFileInitializer):
    """A vocabulary asset, one token per line: token -> line number.

    `TextFileInitializer` names its table after `str(asset)`, which holds
    the Asset object's memory address. Eager tables outlive their Python
    objects under that name, so a later table whose Asset reuses the
    address silently got the old table's contents (seen: one field of a
    second `RawFeatures` all OOV). A unique name per file avoids it; an
    anonymous table would too, but TF1's loader (TF Serving) cannot
    initialise those ("Table not initialized")."""

    def __init__(self, path, field):
        super().__init__(tf.saved_model.Asset(path), tf.string,
                         tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64,
                         tf.lookup.TextFileIndex.LINE_NUMBER)
        self._unique_name = f"alpt_vocabulary_{field}_{uuid.uuid4().hex}"

    @property
    def _shared_name(self):
        return self._unique_name
