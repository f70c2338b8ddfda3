"""`alpt-export`: a saved `.keras` CTR model -> TF Serving SavedModel.

    alpt-export runs/ctr/model.keras serving/ --model-name ctr
    alpt-export runs/criteo-.../model.keras serving/ \
        --vocabulary runs/criteo-.../vocabulary.json

Writes `<base_path>/<model_name>/<next version>/` with `export_for_serving`
and warm-up requests (`--warmup-rows`), and prints the size of every
embedding table next to its float32 equivalent. With `--vocabulary` (the
`vocabulary.json` of a Criteo/Avazu run) `serving_default` takes the raw
columns of the data file, preprocessed in the graph, and `serving_ids` the
ids. Like `alpt-train`, this tool sits above `alpt_keras.models` and
`alpt_keras.export`.
"""

import argparse
import os
import re
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="alpt-export",
        description="Export a .keras CTR model for TensorFlow Serving, "
                    "keeping ALPT tables as integer codes.")
    parser.add_argument("model_file", help="A model saved as .keras.")
    parser.add_argument("base_path", help="TF Serving model base path.")
    parser.add_argument("--model-name", default="ctr")
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--vocabulary", default=None, metavar="FILE",
                        help="vocabulary.json of the Criteo/Avazu training "
                             "run: serve raw columns (serving_default) and "
                             "ids (serving_ids).")
    parser.add_argument("--warmup-rows", type=int, default=16, metavar="N",
                        help="Rows of the warm-up request (ids 0, or empty "
                             "raw values: valid for every model); 0: none.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for flag, path in (("model_file", args.model_file),
                       ("--vocabulary", args.vocabulary)):
        if path is not None and not os.path.isfile(path):
            print(f"alpt-export: {flag} must be an existing file. "
                  f"Received: {path}", file=sys.stderr)
            return 2
    if args.warmup_rows < 0:
        print("alpt-export: --warmup-rows must be >= 0. Received: "
              f"{args.warmup_rows}", file=sys.stderr)
        return 2
    import numpy as np

    import alpt_keras.models  # noqa: F401  (registers the model classes)
    from alpt_keras.compat import keras
    from alpt_keras.export.saved_model import (
        export_for_serving,
        export_size_report,
        serving_input_signature,
    )

    model = keras.models.load_model(args.model_file, compile=False)
    preprocessing = None
    if args.vocabulary:
        from alpt_keras.models import RawFeatures

        preprocessing = RawFeatures.from_vocabulary(args.vocabulary)
    warmup = None
    if args.warmup_rows:
        n = args.warmup_rows
        if preprocessing is not None:  # every value missing
            warmup = {c: np.array([""] * n) for c in preprocessing.columns}
        else:  # id 0 (OOV) of every table; multi-hot rows padded alike
            warmup = {name: np.zeros([n] + list(spec.shape[1:]), np.int64)
                      for name, spec in serving_input_signature(
                          model).items()}
    version_dir = export_for_serving(model, args.base_path, args.model_name,
                                     version=args.version,
                                     warmup_examples=warmup,
                                     preprocessing=preprocessing)
    print_size_report(export_size_report(version_dir))
    print(version_dir)
    return 0


def natural_key(name):
    """Sorts `C2` before `C10`: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name)]


def print_size_report(report):
    print(f"{'table':<28}{'bytes':>14}{'float32 bytes':>16}{'ratio':>8}")
    for name, table in sorted(report["tables"].items(),
                              key=lambda item: natural_key(item[0])):
        ratio = table["bytes"] / max(table["float32_bytes"], 1)
        print(f"{name:<28}{table['bytes']:>14,}"
              f"{table['float32_bytes']:>16,}{ratio:>8.3f}")
    print(f"whole export: {report['total_bytes']:,} bytes")


if __name__ == "__main__":
    raise SystemExit(main())
