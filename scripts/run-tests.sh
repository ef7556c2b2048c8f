#!/usr/bin/env bash
# Runs every test binary given, first on two PoCL devices of one platform,
# then on two platforms (two ICD files naming PoCL, one device each), so the
# same-context and cross-platform paths are both exercised, then on one
# platform with CPU devices forced onto the OpenCL route. Prints one
# "N passed, N failed" line at the end and exits non-zero on any failure.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
export MPAR_CACHE_DIR="${MPAR_CACHE_DIR:-$top/build/cache}"
# mpar never sets PoCL's devices; the tests want two one-core ones
export POCL_DEVICES="${POCL_DEVICES:-basic basic}"
passed=0 failed=0 failures=()
run() {
  local label=$1; shift
  local t
  for t in "$@"; do
    echo "=== $t ($label)"
    if timeout 900 "$t"; then passed=$((passed + 1)); else failed=$((failed + 1)); failures+=("$t ($label)"); fi
  done
}
run "one platform, two devices" "$@"
# The two-platform setup matters to tests that touch devices; pure tests
# (planner, schedule) are skipped there. A suite that takes its context
# from tests/fixture.h touches devices too.
dev_tests=()
for t in "$@"; do grep -q "clGetPlatformIDs\|mpar_create\|fixture\.h" "$t.c" 2>/dev/null && dev_tests+=("$t"); done
if ((${#dev_tests[@]})); then
  OCL_ICD_VENDORS="$top/build/icd2" POCL_DEVICES=basic MPAR_TEST_PLATFORMS=2 run "two platforms" "${dev_tests[@]}"
  # CPU devices take the host route by default when mpar is built with
  # MPAR_USE_CBLAS; the OpenCL kernels are what GPUs run, so the device tests
  # run once more with every layer as OpenCL kernels.
  MPAR_CPU_ROUTE=opencl run "OpenCL route" "${dev_tests[@]}"
fi
for f in "${failures[@]+"${failures[@]}"}"; do echo "FAILED: $f"; done
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
