"""MovieLens-100K as a CTR task, read from the `recbole` wheel.

The wheel `recbole==1.2.1` on PyPI carries MovieLens-100K as tab-separated
atomic files (`ml-100k.inter`, `.user`, `.item`). `download_movielens_100k`
fetches the wheel once into a cache folder (`pip download --no-deps`; recbole
itself, which pulls PyTorch, is never installed) and the files are read from
the zip. MovieLens is licensed for research use only: it is fetched at run
time and never committed.

As CTR: label = rating >= 4 (55% positive); fields user, item, age, gender,
occupation, zip, year (one id each) and genres (multi-hot, up to 6). The
split is a reproducible 8:1:1 hash of (seed, row); vocabularies use the
training split only, with `CTRPipeline`'s ids (0 = OOV, 1 = missing).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib

import numpy as np

from alpt_keras.models.pipeline import (
    FIRST_VALUE_ID,
    MISSING_ID,
    OOV_ID,
    SPLITS,
)
from alpt_keras.validation import check_int

RECBOLE_WHEEL = "recbole==1.2.1"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
SINGLE_FIELDS = ("user", "item", "age", "gender", "occupation", "zip", "year")
MAX_GENRES = 6


def default_cache_dir():
    """`$ALPT_KERAS_CACHE`, else `~/.cache/alpt_keras`."""
    return os.environ.get("ALPT_KERAS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "alpt_keras")


def download_movielens_100k(cache_dir=None, timeout=300):
    """Returns the path of the cached recbole wheel, downloading it once."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    wheels = [f for f in os.listdir(cache_dir)
              if f.startswith("recbole-1.2.1") and f.endswith(".whl")]
    if not wheels:
        # Into a private folder, then renamed into the cache: a process
        # that looks at the cache meanwhile (a second test pass, another
        # alpt-train) never opens half a wheel, and concurrent downloads
        # each publish a whole one.
        staging = tempfile.mkdtemp(prefix=".download-", dir=cache_dir)
        try:
            command = [sys.executable, "-m", "pip", "download", "--no-deps",
                       "--quiet", "--dest", staging, RECBOLE_WHEEL]
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=timeout)
            wheels = [f for f in os.listdir(staging)
                      if f.startswith("recbole-1.2.1") and f.endswith(".whl")]
            if proc.returncode != 0 or not wheels:
                raise RuntimeError(
                    f"Could not download {RECBOLE_WHEEL} (MovieLens-100K) "
                    f"into {cache_dir}: {proc.stderr.strip()[-500:]}")
            os.replace(os.path.join(staging, wheels[0]),
                       os.path.join(cache_dir, wheels[0]))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(cache_dir, wheels[0])


def _read_table(archive, kind):
    text = archive.read(_MEMBER.format(kind)).decode("utf-8", "replace")
    lines = text.splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    return header, [line.split("\t") for line in lines[1:] if line]


class MovieLensCTR:
    """MovieLens-100K as CTR examples with train-only vocabularies.

    Args:
        wheel_path: path of the recbole wheel (or any zip with the same
            members); `None` downloads it into the cache.
        min_count: int >= 1. Values seen fewer times in training are OOV.
            Defaults to `2`.
        split: train/validation/test weights. Defaults to `(8, 1, 1)`.
        seed: int. Seeds the split. Defaults to `0`.
    """

    def __init__(self, wheel_path=None, min_count=2, split=(8, 1, 1), seed=0):
        min_count = check_int("min_count", min_count, minimum=1)
        self.wheel_path = wheel_path or download_movielens_100k()
        self.min_count, self.seed, self.split = min_count, seed, tuple(split)
        with zipfile.ZipFile(self.wheel_path) as archive:
            inter_header, inter = _read_table(archive, "inter")
            user_header, users = _read_table(archive, "user")
            item_header, items = _read_table(archive, "item")
        users = {r[0]: dict(zip(user_header, r, strict=False))
                 for r in users}
        items = {r[0]: dict(zip(item_header, r, strict=False))
                 for r in items}
        column = {h: i for i, h in enumerate(inter_header)}
        self.tokens, genres, labels = [], [], []
        for row in inter:
            user = users.get(row[column["user_id"]], {})
            item = items.get(row[column["item_id"]], {})
            self.tokens.append([
                row[column["user_id"]], row[column["item_id"]],
                user.get("age"), user.get("gender"), user.get("occupation"),
                user.get("zip_code"), item.get("release_year"),
            ])
            genres.append((item.get("class") or "").split()[:MAX_GENRES])
            labels.append(float(row[column["rating"]]) >= 4.0)
        self.tokens = [[t if t else None for t in r] for r in self.tokens]
        self.genres = genres
        self.labels = np.asarray(labels, dtype=np.float32)
        cumulative = np.cumsum(self.split) / sum(self.split)
        draws = np.array([zlib.crc32(f"{seed}:{i}".encode()) / 2**32
                          for i in range(len(labels))])
        self.row_splits = np.array(SPLITS)[np.searchsorted(
            cumulative, draws, side="right")]
        self._fit()

    def _fit(self):
        train = self.row_splits == "train"
        self.vocabularies = {}
        for j, name in enumerate(SINGLE_FIELDS):
            counts = {}
            for row, keep in zip(self.tokens, train, strict=True):
                if keep and row[j] is not None:
                    counts[row[j]] = counts.get(row[j], 0) + 1
            self.vocabularies[name] = self._ids(counts)
        counts = {}
        for bag, keep in zip(self.genres, train, strict=True):
            for genre in bag if keep else ():
                counts[genre] = counts.get(genre, 0) + 1
        self.vocabularies["genres"] = self._ids(counts)

    def _ids(self, counts):
        kept = sorted((t for t, c in counts.items() if c >= self.min_count),
                      key=lambda t: (-counts[t], t))
        return {t: i + FIRST_VALUE_ID for i, t in enumerate(kept)}

    def vocabulary_sizes(self):
        return {n: len(v) + FIRST_VALUE_ID
                for n, v in self.vocabularies.items()}

    def arrays(self, split="train"):
        """`(features, labels)`: int64 `[n]` per field, genres `[n, 6]`
        padded with -1, float32 labels."""
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}. "
                             f"Received: split={split!r}")
        rows = np.flatnonzero(self.row_splits == split)
        features = {}
        for j, name in enumerate(SINGLE_FIELDS):
            vocabulary = self.vocabularies[name]
            features[name] = np.array(
                [MISSING_ID if self.tokens[r][j] is None else
                 vocabulary.get(self.tokens[r][j], OOV_ID) for r in rows],
                dtype=np.int64)
        genres = np.full((len(rows), MAX_GENRES), -1, dtype=np.int64)
        vocabulary = self.vocabularies["genres"]
        for out, r in enumerate(rows):
            for k, genre in enumerate(self.genres[r]):
                genres[out, k] = vocabulary.get(genre, OOV_ID)
        features["genres"] = genres
        return features, self.labels[rows]

    def feature_configs(self, **table_kwargs):
        """`FeatureConfig`s (genres multi-hot, mean) for these fields."""
        from alpt_keras.models.features import FeatureConfig, TableConfig

        sizes = self.vocabulary_sizes()
        configs = []
        for i, name in enumerate(SINGLE_FIELDS + ("genres",)):
            kwargs = dict(table_kwargs)
            kwargs["seed"] = kwargs.get("seed", 0) + i
            table = TableConfig(name, sizes[name], **kwargs)
            configs.append(FeatureConfig(
                name, table, max_ids=MAX_GENRES if name == "genres" else None,
                combiner="mean"))
        return configs
