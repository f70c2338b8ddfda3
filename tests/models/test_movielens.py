"""MovieLens-100K from the recbole wheel, as CTR."""

import zipfile

import numpy as np
import pytest

from alpt_keras import ALPTOptimizer
from alpt_keras._keras import keras
from alpt_keras.models.ctr_models import build_ctr_model
from alpt_keras.models.movielens import MovieLensCTR, download_movielens_100k

MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"


def _fake_wheel(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER.format("inter"),
                   "user_id:token\titem_id:token\trating:float\t"
                   "timestamp:float\n" + "".join(
                       f"{u}\t{i}\t{r}\t0\n" for u, i, r in
                       [(1, 10, 5), (1, 11, 2), (2, 10, 4), (2, 12, 3),
                        (3, 10, 1), (3, 11, 4)] * 5))
        z.writestr(MEMBER.format("user"),
                   "user_id:token\tage:token\tgender:token\t"
                   "occupation:token\tzip_code:token\n"
                   "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n"
                   "3\t23\tM\twriter\t\n")
        z.writestr(MEMBER.format("item"),
                   "item_id:token\tmovie_title:token_seq\t"
                   "release_year:token\tclass:token_seq\n"
                   "10\tA\t1995\tAnimation Comedy\n11\tB\t\tDrama\n"
                   "12\tC\t1994\t\n")
    return str(path)


def test_parsing_labels_missing_and_multi_hot(tmp_path):
    data = MovieLensCTR(_fake_wheel(tmp_path / "fake.whl"), min_count=1,
                        split=(1, 0, 0))
    features, labels = data.arrays("train")
    assert len(labels) == 30
    np.testing.assert_array_equal(labels[:6], [1, 0, 1, 0, 0, 1])
    sizes = data.vocabulary_sizes()
    assert sizes["user"] == 2 + 3 and sizes["genres"] == 2 + 3
    assert features["zip"][4] == 1  # user 3 has no zip: missing id
    assert features["year"][1] == 1  # item 11 has no year
    genres = features["genres"]
    assert genres.shape == (30, 6)
    assert (genres[0] >= 2).sum() == 2 and (genres[0] == -1).sum() == 4
    assert (genres[3] == -1).all()  # item 12 has no genre
    configs = data.feature_configs(embedding_dim=4, kind="lpt")
    assert [c.name for c in configs][-1] == "genres"
    assert configs[-1].max_ids == 6


@pytest.mark.slow
def test_real_movielens_trains(tmp_path):
    wheel = download_movielens_100k(str(tmp_path / "cache"))
    assert download_movielens_100k(str(tmp_path / "cache")) == wheel  # cached
    data = MovieLensCTR(wheel)
    total = sum(len(data.arrays(s)[1]) for s in ("train", "validation",
                                                 "test"))
    assert total == 100_000
    assert 0.54 < data.labels.mean() < 0.56  # 55% ratings >= 4
    x, y = data.arrays("train")
    x_test, y_test = data.arrays("test")
    model = build_ctr_model(data.feature_configs(embedding_dim=8),
                            model="deepfm", hidden_units=(32,))
    model.compile(ALPTOptimizer(keras.optimizers.Adam(1e-3)),
                  "binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    model.fit(x, y, batch_size=512, epochs=2, verbose=0)
    _, auc = model.evaluate(x_test, y_test, batch_size=4096, verbose=0)
    assert auc > 0.70, auc  # user and item ids alone carry this much
