"""Avazu CTR (Kaggle) CSV files.

Header `id,click,hour,C1,banner_pos,site_id,...,C21` (24 columns); `hour` is
`YYMMDDHH` and becomes three fields: hour of day, weekday and weekend. The
21 categorical columns follow the vocabulary rules of `CTRPipeline`. A file
without the `click` column (Kaggle's `test.csv`) is read as unlabeled:
prediction only. Avazu's data cannot be redistributed: point `path` at your
own copy.
"""

import datetime

from alpt_keras.models.pipeline import CTRPipeline, MalformedLine, open_text

CATEGORICAL = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model",
    "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18",
    "C19", "C20", "C21",
)
TIME_FIELDS = ("hour_of_day", "weekday", "is_weekend")
LABELED_HEADER = ("id", "click", "hour") + CATEGORICAL
UNLABELED_HEADER = ("id", "hour") + CATEGORICAL


class AvazuPipeline(CTRPipeline):
    """`CTRPipeline` for Avazu CSV files; `labeled` follows the header."""

    field_names = CATEGORICAL + TIME_FIELDS

    def __init__(self, path, **kwargs):
        if "labeled" in kwargs:
            raise TypeError("AvazuPipeline reads `labeled` from the header. "
                            f"Received: labeled={kwargs['labeled']!r}")
        super().__init__(path, **kwargs)
        with open_text(path) as f:  # gzip and a BOM, like the rows
            header = tuple(f.readline().strip().split(","))
        if header == LABELED_HEADER:
            self.labeled = True
        elif header == UNLABELED_HEADER:
            self.labeled = False
        else:
            raise ValueError(
                f"{path} does not start with an Avazu header "
                f"({','.join(LABELED_HEADER)}, or without `click`). "
                f"Received: {','.join(header)[:200]}")
        self._width = len(header)

    def _skip_line(self, number, line):
        return number == 1 or not line

    def parse(self, line):
        columns = line.split(",")
        if len(columns) != self._width:
            raise MalformedLine(
                f"expected {self._width} comma-separated columns, "
                f"found {len(columns)}")
        label = None
        if self.labeled:
            if columns[1] not in ("0", "1"):
                raise MalformedLine(
                    f"click must be 0 or 1, found {columns[1]!r}")
            label = float(columns[1])
            columns = columns[:1] + columns[2:]
        hour = columns[1]
        try:
            when = datetime.datetime.strptime(hour, "%y%m%d%H")
        except ValueError:
            raise MalformedLine(
                f"hour must be YYMMDDHH, found {hour!r}") from None
        tokens = [c if c != "" else None for c in columns[2:]]
        weekday = when.weekday()
        tokens += [str(when.hour), str(weekday), str(int(weekday >= 5))]
        return label, tokens
