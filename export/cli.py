"""`alpt-export`: a saved `.keras` CTR model -> TF Serving SavedModel.

    alpt-export runs/ctr/model.keras serving/ --model-name ctr

Writes `<base_path>/<model_name>/<next version>/` with `export_for_serving`
and prints the size of every embedding table next to its float32
equivalent.
"""

import argparse
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
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import alpt_keras.models  # noqa: F401  (registers the model classes)
    from alpt_keras.compat import keras
    from alpt_keras.export.saved_model import (
        export_for_serving,
        export_size_report,
    )

    model = keras.models.load_model(args.model_file, compile=False)
    version_dir = export_for_serving(model, args.base_path, args.model_name,
                                     version=args.version)
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
