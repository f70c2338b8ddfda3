#!/usr/bin/env bash
# Lint, then the test suite once per Keras flavour, each in its own process
# (the flavour is fixed when TensorFlow first imports Keras), both at once:
#   1. Keras 3 (the default `tf.keras`),
#   2. tf_keras (`TF_USE_LEGACY_KERAS=1`), which TFRS needs,
#   3. after 2: the core and distributed tests again under Keras 3 with the
#      native kernels forced off (`ALPT_KERNELS=stock`; passes 1 and 2 use
#      them, built on first use). tests/core/test_kernels.py is left out
#      there: each of its tests sets the mode it checks, so it would only
#      repeat pass 1.
# Extra arguments go to every pytest run. Exits non-zero if anything fails.
set -u
cd "$(dirname "$0")/.."
reports=$(mktemp -d)
status=0

echo "== ruff =="
python -m ruff check . || status=1

# The two passes run at the same time, each in its own process, and their
# logs are printed one after the other. A pass keeps about one core busy
# (measured: tests/models, 98% CPU), so on 2 cores both together take
# about as long as one alone. ALPT_TESTS_SERIAL=1 runs them one by one.
keras3() {
  env -u TF_USE_LEGACY_KERAS python -m pytest \
    --junitxml="$reports/keras3.xml" "$@"
}
tf_keras() {
  TF_USE_LEGACY_KERAS=1 python -m pytest --junitxml="$reports/tf_keras.xml" \
    "$@"
}
stock_kernels() {
  env -u TF_USE_LEGACY_KERAS ALPT_KERNELS=stock python -m pytest \
    --junitxml="$reports/stock_kernels.xml" tests/core tests/distributed \
    --ignore=tests/core/test_kernels.py "$@"
}
if [ "${ALPT_TESTS_SERIAL:-0}" = 1 ]; then
  echo "== pytest, Keras 3 =="
  keras3 "$@" || status=1
  echo "== pytest, tf_keras (TF_USE_LEGACY_KERAS=1) =="
  tf_keras "$@" || status=1
  echo "== pytest, core and distributed, stock ops (ALPT_KERNELS=stock) =="
  stock_kernels "$@" || status=1
else
  keras3 "$@" >"$reports/keras3.log" 2>&1 &
  first=$!
  { tf_keras "$@" >"$reports/tf_keras.log" 2>&1 || exit 1
    stock_kernels "$@" >"$reports/stock_kernels.log" 2>&1; } &
  second=$!
  wait $first || status=1
  wait $second || status=1
  echo "== pytest, Keras 3 =="
  cat "$reports/keras3.log"
  echo "== pytest, tf_keras (TF_USE_LEGACY_KERAS=1) =="
  cat "$reports/tf_keras.log"
  echo "== pytest, core and distributed, stock ops (ALPT_KERNELS=stock) =="
  cat "$reports/stock_kernels.log" 2>/dev/null || echo "(not run)"
fi

python - "$reports" <<'PY' || status=1
import glob
import sys
import xml.etree.ElementTree as ET

total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
files = sorted(glob.glob(sys.argv[1] + "/*.xml"))
for path in files:
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in total:
            total[key] += int(suite.get(key, 0))
failed = total["failures"] + total["errors"]
passed = total["tests"] - failed - total["skipped"]
print(f"both flavours and the stock-ops rerun ({len(files)} runs):")
print(f"total: {passed} passed, {failed} failed, {total['skipped']} skipped")
sys.exit(1 if failed or len(files) != 3 or passed == 0 else 0)
PY
rm -rf "$reports"
exit $status
