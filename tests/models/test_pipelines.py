"""Criteo and Avazu pipelines on small files in the exact formats."""

import gzip

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras.models.avazu import AvazuPipeline
from alpt_keras.models.criteo import CriteoPipeline, bucketize
from alpt_keras.models.pipeline import MISSING_ID, OOV_ID, EmptyDataError


def _criteo_line(label, numerics, categoricals):
    return "\t".join([str(label)] + [str(v) for v in numerics]
                     + list(categoricals))


def _criteo_file(tmp_path, lines):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_bucketize_follows_the_paper():
    # floor(ln(x)^2) for x > 2, else int(x).
    assert [bucketize(x) for x in (-3, 0, 1, 2, 2.5, 3, 10, 1000)] == [
        "-3", "0", "1", "2", "0", "1", "5", "47"]


def test_criteo_vocabulary_missing_rare_and_train_only(tmp_path):
    rows = []
    for i in range(200):
        numerics = [i % 7] + [""] * 12  # I2..I13 missing
        cats = ["common", f"rare{i}"] + [""] * 24
        rows.append(_criteo_line(i % 2, numerics, cats))
    path = _criteo_file(tmp_path, rows)
    pipeline = CriteoPipeline(path, seed=3)
    splits = [pipeline.row_split(n) for n in range(1, 201)]
    assert 130 < splits.count("train") < 190  # about 8:1:1
    # A value seen twice, but only outside the training split, is OOV.
    held_out = [n for n, s in enumerate(splits, 1) if s != "train"][:2]
    for n in held_out:
        rows[n - 1] = rows[n - 1].replace(f"rare{n - 1}", "heldout")
    path = _criteo_file(tmp_path, rows)
    pipeline = CriteoPipeline(path, seed=3).fit()
    vocab = pipeline.vocabularies
    assert "heldout" not in vocab["C2"]
    assert set(vocab["C1"]) == {"common"}  # rare{i}: once each -> OOV
    assert pipeline.vocabulary_sizes()["C2"] == 2  # OOV + missing only
    features, labels = pipeline.arrays("test")
    assert set(features["C2"]) == {OOV_ID}
    assert set(features["C3"]) == {MISSING_ID}
    assert set(features["I2"]) == {MISSING_ID}
    assert features["C1"].min() == 2 and labels.dtype == np.float32
    # I1 = i % 7 = 0..6 -> buckets 0, 1, 2, 1, 1, 2, 3 (floor(ln(x)^2) for
    # x > 2): four values, the most frequent ("1") first.
    assert set(vocab["I1"]) == {"0", "1", "2", "3"}
    assert vocab["I1"]["1"] == 2
    total = sum(len(pipeline.arrays(s)[1]) for s in
                ("train", "validation", "test"))
    assert total == 200


def test_criteo_malformed_lines_are_counted_or_rejected(tmp_path):
    good = _criteo_line(1, [1] * 13, ["a"] * 26)
    lines = [good, good, "1\t2\t3",
             _criteo_line(2, [1] * 13, ["a"] * 26),
             _criteo_line(0, ["x"] + [1] * 12, ["a"] * 26), good]
    path = _criteo_file(tmp_path, lines)
    pipeline = CriteoPipeline(path, split=(1, 0, 0)).fit()
    assert pipeline.report["malformed"] == 3
    reported = [(e["line"], e["reason"])
                for e in pipeline.report["malformed_examples"]]
    assert [n for n, _ in reported] == [3, 4, 5]
    assert "expected 40 tab-separated columns, found 3" in reported[0][1]
    assert "label must be 0 or 1, found '2'" in reported[1][1]
    assert "I1 must be a number, found 'x'" in reported[2][1]
    assert len(pipeline.arrays("train")[1]) == 3
    with pytest.raises(ValueError, match="line 3: expected 40"):
        CriteoPipeline(path, split=(1, 0, 0), strict=True).fit()


def test_criteo_streams_in_batches_and_reproduces(tmp_path):
    lines = [_criteo_line(i % 2, [i] * 13, [f"v{i % 5}"] * 26)
             for i in range(100)]
    path = _criteo_file(tmp_path, lines)
    a = CriteoPipeline(path, seed=1).fit()
    chunks = list(a.batches("train", batch_size=16))
    assert len(chunks) > 2 and all(len(c[1]) <= 16 for c in chunks)
    b = CriteoPipeline(path, seed=1).fit()
    fa, la = a.arrays("train")
    fb, lb = b.arrays("train")
    np.testing.assert_array_equal(la, lb)
    for name in a.field_names:
        np.testing.assert_array_equal(fa[name], fb[name])
    other = CriteoPipeline(path, seed=2).fit()
    assert len(other.arrays("train")[1]) != len(la) or not np.array_equal(
        other.arrays("train")[0]["I1"], fa["I1"])
    batch = next(iter(a.dataset("train", batch_size=8)))
    assert batch[0]["C1"].dtype == tf.int64 and batch[1].shape == (8,)


def test_vocabulary_save_load_and_hashing(tmp_path):
    lines = [_criteo_line(i % 2, [i] * 13, [f"v{i % 3}"] * 26)
             for i in range(60)]
    path = _criteo_file(tmp_path, lines)
    fitted = CriteoPipeline(path).fit()
    vocab_path = str(tmp_path / "vocabulary.json")
    fitted.save_vocabulary(vocab_path)
    loaded = CriteoPipeline(path).load_vocabulary(vocab_path)
    fa, _ = fitted.arrays("test")
    fb, _ = loaded.arrays("test")
    for name in fitted.field_names:
        np.testing.assert_array_equal(fa[name], fb[name])
    with pytest.raises(ValueError, match="Call `fit\\(\\)`"):
        list(CriteoPipeline(path).batches())
    hashed = CriteoPipeline(path, hash_buckets=50).fit()
    assert hashed.vocabulary_sizes()["C1"] == 52
    fh, _ = hashed.arrays("train")
    assert fh["C1"].min() >= 2 and fh["C1"].max() < 52
    assert len(hashed.feature_configs(embedding_dim=4)) == 39


@pytest.mark.parametrize("bad, message", [
    (dict(min_count=0), "min_count=0"),
    (dict(split=(1, 1)), "split=(1, 1)"),
    (dict(hash_buckets=-1), "hash_buckets=-1"),
])
def test_pipeline_argument_errors(tmp_path, bad, message):
    path = _criteo_file(tmp_path, [_criteo_line(1, [1] * 13, ["a"] * 26)])
    with pytest.raises(ValueError) as info:
        CriteoPipeline(path, **bad)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="path="):
        CriteoPipeline(str(tmp_path / "missing.txt"))


AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,"
                "site_category,app_id,app_domain,app_category,device_id,"
                "device_ip,device_model,device_type,device_conn_type,C14,C15,"
                "C16,C17,C18,C19,C20,C21")


def _avazu_row(i, click, hour):
    cats = ["1005", "0", f"site{i % 3}", "dom", "cat", "app", "adom", "acat",
            "dev", f"ip{i}", "model", "1", "0", "15706", "320", "50", "1722",
            "0", "35", "-1", "79"]
    return ",".join([str(10**18 + i)] + ([str(click)] if click is not None
                                         else []) + [hour] + cats)


def test_avazu_time_fields_and_vocabulary(tmp_path):
    path = tmp_path / "train.csv"
    rows = [AVAZU_HEADER] + [_avazu_row(i, i % 2, "14102100" if i % 2 else
                                        "14102513") for i in range(40)]
    rows.append(_avazu_row(99, 1, "14109999"))  # malformed hour
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    pipeline = AvazuPipeline(str(path), split=(1, 0, 0)).fit()
    assert pipeline.labeled
    assert pipeline.report["malformed"] == 1
    assert pipeline.report["malformed_examples"][0]["line"] == 42
    features, labels = pipeline.arrays("train")
    assert len(labels) == 40
    vocab = pipeline.vocabularies
    # 2014-10-21 00h is a Tuesday (weekday 1); 2014-10-25 13h a Saturday.
    assert set(vocab["hour_of_day"]) == {"0", "13"}
    assert set(vocab["weekday"]) == {"1", "5"}
    assert set(vocab["is_weekend"]) == {"0", "1"}
    assert set(features["device_ip"]) == {0}  # every ip seen once: OOV
    assert len(vocab["site_id"]) == 3


def test_avazu_unlabeled_file_is_prediction_only(tmp_path):
    header = AVAZU_HEADER.replace("id,click,", "id,")
    path = tmp_path / "test.csv"
    path.write_text("\n".join([header] + [_avazu_row(i, None, "14103100")
                                          for i in range(5)]) + "\n")
    pipeline = AvazuPipeline(str(path), split=(1, 0, 0)).fit()
    assert not pipeline.labeled
    features, labels = pipeline.arrays("train")
    assert labels is None and len(features["C1"]) == 5
    with pytest.raises(ValueError, match="no labels"):
        pipeline.dataset("train")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="Avazu header"):
        AvazuPipeline(str(bad))


def _rows(n=60):
    return [_criteo_line(i % 2, [i % 5] * 13, [f"c{i % 3}"] * 26)
            for i in range(n)]


def test_gzip_and_bom_files_read_like_plain_ones(tmp_path):
    plain = _criteo_file(tmp_path, _rows())
    text = open(plain, encoding="utf-8").read()
    gz = tmp_path / "train.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(text)
    bare_gz = tmp_path / "gzipped_without_suffix.txt"  # found by magic
    bare_gz.write_bytes(gz.read_bytes())
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    want = CriteoPipeline(plain).fit()
    want_arrays = want.arrays("train")
    for path in (gz, bare_gz, bom):
        got = CriteoPipeline(str(path)).fit()
        assert got.report == want.report, path  # BOM: row 1 not malformed
        assert got.report["malformed"] == 0
        assert got.vocabularies == want.vocabularies
        features, labels = got.arrays("train")
        np.testing.assert_array_equal(labels, want_arrays[1])
        for name in features:
            np.testing.assert_array_equal(features[name],
                                          want_arrays[0][name])


@pytest.mark.parametrize("content, reason", [
    ("", "empty or holds only a header"),
    ("\n\n", "empty or holds only a header"),
    ("bad\tline\nworse\n", "every one of its 2 lines is malformed"),
])
def test_a_file_without_data_lines_is_one_clear_error(tmp_path, content,
                                                      reason):
    path = tmp_path / "train.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EmptyDataError, match=reason):
        CriteoPipeline(str(path)).fit()
    with pytest.raises(EmptyDataError, match=reason):
        CriteoPipeline(str(path), hash_buckets=10).fit()


def test_a_header_only_avazu_file_is_one_clear_error(tmp_path):
    path = tmp_path / "train.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8-sig") as f:  # gzip + BOM
        f.write(AVAZU_HEADER + "\n")
    with pytest.raises(EmptyDataError, match="only a header"):
        AvazuPipeline(str(path)).fit()


def test_report_counts_good_rows_per_split(tmp_path):
    pipeline = CriteoPipeline(_criteo_file(tmp_path, _rows(200))).fit()
    rows = pipeline.report["rows"]
    assert sum(rows.values()) == 200
    assert rows["train"] == len(pipeline.arrays("train")[1])
