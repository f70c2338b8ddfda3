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
    # The columns a raw-feature export takes (`models.RawFeatures`): the
    # file's, without `id` and `click`.
    raw_columns = ("hour",) + CATEGORICAL

    def _columns(self, line):
        return line.split(",")

    def raw_values(self, columns):
        return columns[2:] if self.labeled else columns[1:]

    @staticmethod
    def graph_tokens(raw):
        """`parse` in TensorFlow, for serving: `hour` (`YYMMDDHH`, as
        `strptime("%y%m%d%H")` reads it: 69-99 are 19xx) becomes hour of
        day, weekday (Monday 0) and weekend; a value that is not a real
        date and hour fails with `InvalidArgumentError` naming `hour`. The
        categorical columns pass through (`""` = missing)."""
        import tensorflow as tf

        from alpt_keras.table import fail_check

        hour = raw["hour"]
        digits = tf.strings.regex_full_match(hour, "[0-9]{8}")
        safe = tf.where(digits, hour, "70010100")

        def part(start):
            return tf.strings.to_number(tf.strings.substr(safe, start, 2),
                                        tf.int64)

        yy, month, day, hh = part(0), part(2), part(4), part(6)
        year = tf.where(yy >= 69, 1900 + yy, 2000 + yy)
        leap = tf.logical_and(tf.equal(year % 4, 0), tf.logical_or(
            tf.not_equal(year % 100, 0), tf.equal(year % 400, 0)))
        month_days = tf.gather(
            tf.constant([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31],
                        tf.int64), tf.clip_by_value(month - 1, 0, 11))
        month_days += tf.cast(tf.logical_and(leap, tf.equal(month, 2)),
                              tf.int64)
        valid = digits & (month >= 1) & (month <= 12) & (day >= 1) & \
            (day <= month_days) & (hh <= 23)
        check = fail_check([
            "Avazu column hour must be YYMMDDHH (a real date and hour). "
            "Received (first 10):",
            tf.boolean_mask(hour, tf.logical_not(valid))[:10]],
            condition=tf.reduce_all(valid))
        with tf.control_dependencies([check]):
            # Days since 1970-01-01 (H. Hinnant's days_from_civil); that
            # day was a Thursday (weekday 3).
            y = year - tf.cast(month <= 2, tf.int64)
            era = tf.math.floordiv(y, 400)
            yoe = y - era * 400
            shifted = tf.where(month > 2, month - 3, month + 9)
            doy = (153 * shifted + 2) // 5 + day - 1
            doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
            days = era * 146097 + doe - 719468
            weekday = tf.math.floormod(days + 3, 7)
        tokens = {name: raw[name] for name in CATEGORICAL}
        tokens["hour_of_day"] = tf.strings.as_string(hh)
        tokens["weekday"] = tf.strings.as_string(weekday)
        tokens["is_weekend"] = tf.strings.as_string(
            tf.cast(weekday >= 5, tf.int64))
        return tokens

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
            # Exactly 8 digits: strptime alone would also take "1410211"
            # (hour 1), which the serving graph's fixed-width parse does not.
            if len(hour) != 8 or not hour.isdigit():
                raise ValueError(hour)
            when = datetime.datetime.strptime(hour, "%y%m%d%H")
        except ValueError:
            raise MalformedLine(
                f"hour must be YYMMDDHH, found {hour!r}") from None
        tokens = [c if c != "" else None for c in columns[2:]]
        weekday = when.weekday()
        tokens += [str(when.hour), str(weekday), str(int(weekday >= 5))]
        return label, tokens
