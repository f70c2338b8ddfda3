"""`python -m alpt_keras.cli`: the same as `alpt-train`."""

from alpt_keras.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
