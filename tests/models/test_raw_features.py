"""`RawFeatures`: the pipelines' preprocessing as a serving graph (issue
14, item 7) gives the ids the Python pipeline gives, on every value of the
data, and refuses what the pipeline would call malformed."""

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras.models import RawFeatures
from alpt_keras.models.avazu import CATEGORICAL as AVAZU_CATEGORICAL
from alpt_keras.models.avazu import AvazuPipeline
from alpt_keras.models.criteo import CriteoPipeline
from alpt_keras.models.pipeline import MISSING_ID, OOV_ID

# Integer-column values: the bins' edges (2 | 3), negatives, decimals,
# exponents, values whose ln(x)^2 sits close to an integer, large ones.
NUMBERS = ["", "0", "1", "2", "3", "-1", "-3", "2.5", "2.0000001", "0.5",
           "-0.5", "1e3", "1E2", "7", "8", "20", "21", "54", "55", "148",
           "149", "403", "1097", "2981", "8103", "22026", "65535",
           "999999", "123456789", "+4", ".5", "5."]


def _criteo_file(path, rows, seed):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        label = str(int(rng.integers(0, 2)))
        numbers = list(rng.choice(NUMBERS, 13))
        cats = [f"{j:x}{int(rng.integers(0, 600)):x}" if rng.random() > 0.1
                else "" for j in range(26)]
        lines.append("\t".join([label] + numbers + cats))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _ids(raw, columns):
    out = raw({c: tf.constant(v) for c, v in columns.items()})
    return out


def _compare(pipeline):
    """Every good line of the file, through both: ids must be equal."""
    want, _ = pipeline.arrays("all")
    raw = RawFeatures(pipeline)
    got = _ids(raw, pipeline.raw_rows("all", limit=10**6))
    for name in pipeline.field_names:
        np.testing.assert_array_equal(got[name].numpy(), want[name],
                                      err_msg=name)
    return want


@pytest.mark.parametrize("hash_buckets", [None, 50])
def test_criteo_graph_ids_equal_the_pipeline_on_every_value(tmp_path,
                                                            hash_buckets):
    path = _criteo_file(tmp_path / "train.txt", 3000, seed=0)
    pipeline = CriteoPipeline(path, min_count=2,
                              hash_buckets=hash_buckets).fit()
    want = _compare(pipeline)
    # The file holds what the check needs: every listed number, values
    # seen once in training (OOV), missing values.
    assert (want["I1"] == MISSING_ID).any()
    if hash_buckets is None:
        assert (want["C1"] == OOV_ID).any() or (want["C2"] == OOV_ID).any()
        numbers = set(pipeline.raw_rows("all", 10**6)["I1"])
        assert numbers == set(NUMBERS)


def test_unseen_values_and_a_new_file_go_through_the_saved_vocabulary(
        tmp_path):
    train = _criteo_file(tmp_path / "train.txt", 2000, seed=0)
    fitted = CriteoPipeline(train).fit()
    fitted.save_vocabulary(str(tmp_path / "vocabulary.json"))
    day2 = _criteo_file(tmp_path / "day2.txt", 500, seed=7)
    reader = CriteoPipeline(day2).load_vocabulary(
        str(tmp_path / "vocabulary.json"))
    want, _ = reader.arrays("all")
    raw = RawFeatures.from_vocabulary(str(tmp_path / "vocabulary.json"))
    got = _ids(raw, reader.raw_rows("all", 10**6))
    for name in reader.field_names:
        np.testing.assert_array_equal(got[name].numpy(), want[name],
                                      err_msg=name)
    columns = {c: tf.constant(["never-seen", ""]) for c in raw.columns}
    columns.update({f"I{i}": tf.constant(["123456789012", ""])
                    for i in range(1, 14)})
    ids = raw(columns)
    assert ids["C5"].numpy().tolist() == [OOV_ID, MISSING_ID]
    assert ids["I5"].numpy().tolist() == [OOV_ID, MISSING_ID]


@pytest.mark.parametrize("value, message", [
    ("abc", "Criteo column I4 must be a number or empty"),
    (" 5", "Criteo column I4 must be a number or empty"),
    ("0x10", "Criteo column I4 must be a number or empty"),
    ("nan", "Criteo column I4 must be a number or empty"),
    ("1e999", "Criteo column I4 must be finite"),
])
def test_an_integer_column_that_does_not_parse_names_the_column(
        tmp_path, value, message):
    path = _criteo_file(tmp_path / "train.txt", 50, seed=0)
    raw = RawFeatures(CriteoPipeline(path).fit())
    columns = {c: ["1", value] if c == "I4" else ["1", "1"]
               for c in raw.columns}
    serve = tf.function(raw, input_signature=[raw.input_signature()])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serve({c: tf.constant(v) for c, v in columns.items()})


def _avazu_file(path, hours, seed=0):
    rng = np.random.default_rng(seed)
    lines = [",".join(("id", "click", "hour") + AVAZU_CATEGORICAL)]
    for i, hour in enumerate(hours):
        cats = [f"v{int(rng.integers(0, 5))}" if rng.random() > 0.1 else ""
                for _ in AVAZU_CATEGORICAL]
        lines.append(",".join([str(i), str(int(rng.integers(0, 2))), hour]
                              + cats))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_avazu_hours_become_the_pipeline_time_fields(tmp_path):
    # Every hour of October 2014 (Avazu's ten days and more), leap days,
    # the 1969/1970 and 1999/2000 turns of strptime's %y, and month ends.
    hours = [f"1410{d:02d}{h:02d}" for d in range(1, 32) for h in range(24)]
    hours += ["16022912", "00022900", "99123123", "69010100", "68123123",
              "70010100", "14123123", "15010100", "12022923"]
    path = _avazu_file(tmp_path / "train.csv", hours * 2)
    pipeline = AvazuPipeline(path, min_count=1, split=(1, 0, 0)).fit()
    want = _compare(pipeline)
    assert len(set(want["weekday"].tolist())) == 7


@pytest.mark.parametrize("hour", ["14023012", "15022900", "1410211",
                                  "14103124", "14133112", "1410x112"])
def test_an_hour_that_is_not_a_date_names_the_column(tmp_path, hour):
    path = _avazu_file(tmp_path / "train.csv", ["14102100"] * 20)
    pipeline = AvazuPipeline(path, split=(1, 0, 0)).fit()
    # The Python pipeline calls these lines malformed, too.
    with pytest.raises(Exception, match="hour must be YYMMDDHH"):
        pipeline.parse(",".join(["1", "0", hour] + ["a"] * 21))
    raw = RawFeatures(pipeline)
    columns = {c: tf.constant(["a", "a"]) for c in raw.columns}
    columns["hour"] = tf.constant(["14102100", hour])
    serve = tf.function(raw, input_signature=[raw.input_signature()])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="Avazu column hour must be YYMMDDHH"):
        serve(columns)


def test_a_pipeline_without_raw_columns_is_refused(tmp_path):
    from alpt_keras.models.pipeline import CTRPipeline

    class Plain(CTRPipeline):
        field_names = ("a",)

    path = tmp_path / "x.txt"
    path.write_text("1\n")
    with pytest.raises(TypeError, match="defines no `raw_columns`"):
        RawFeatures(Plain(str(path)))


def test_a_new_vocabulary_never_reads_an_old_table(tmp_path):
    """Eager tables outlive their Python objects under their shared name;
    `TextFileInitializer` derives it from the Asset's memory address, so a
    new table at a reused address read the old one's contents (6 of 30
    lookups below, measured with the stock initializer)."""
    import gc

    from alpt_keras.models.raw_features import _VocabularyFile

    stale = 0
    for i in range(30):
        path = tmp_path / f"v{i}.vocab"
        path.write_text(f"a{i}\nb{i}\n")
        table = tf.lookup.StaticHashTable(_VocabularyFile(str(path), "f"),
                                          default_value=-1)
        stale += int(table.lookup(tf.constant([f"b{i}"])).numpy()[0] != 1)
        del table
        gc.collect()
    assert stale == 0
