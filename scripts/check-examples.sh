#!/usr/bin/env bash
# The examples behave like tools: `--help` exits 0 with the usage on stdout,
# an unknown option, a value missing or a value that is not a number exits 2
# with the usage on stderr (before any device is touched), and
# `examples/plan --json` prints JSON alone on stdout.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
export MPAR_CACHE_DIR="${MPAR_CACHE_DIR:-$top/build/cache}"
export POCL_DEVICES="${POCL_DEVICES:-basic basic}"
bad=0
fail() { echo "check-examples: $*" >&2; bad=1; }
for e in char_gpt fashion_mnist infer plan demo custom_layer generate; do
  x=examples/$e
  out=$("$x" --help 2>/dev/null); rc=$?
  [ $rc -eq 0 ] || fail "$e --help exited $rc"
  case $out in "usage: examples/$e"*) ;; *) fail "$e --help printed no usage" ;; esac
  err=$(timeout 20 "$x" --no-such-option 2>&1 >/dev/null); rc=$?
  [ $rc -eq 2 ] || fail "$e --no-such-option exited $rc (want 2)"
  case $err in *"unknown option '--no-such-option'"*usage:*) ;; *) fail "$e: no reason and usage for an unknown option" ;; esac
done
for args in "char_gpt --steps" "char_gpt --steps ten" "fashion_mnist --epochs 2x" "plan --microbatch 8" \
            "plan --json=1" "infer --samples" "demo extra" "generate --tokens x" "generate --prompt"; do
  timeout 20 examples/$args >/dev/null 2>&1; rc=$?
  [ $rc -eq 2 ] || fail "examples/$args exited $rc (want 2)"
done
if command -v python3 >/dev/null; then
  timeout 300 examples/plan --json 2>/dev/null | python3 -m json.tool >/dev/null || fail "plan --json is not JSON alone"
  timeout 300 examples/plan --model gpt --json --schedule zbh1 2>/dev/null | python3 -m json.tool >/dev/null ||
    fail "plan --model gpt --json is not JSON alone"
else
  echo "check-examples: python3 missing, plan --json not parsed (apt-get install python3)"
fi
[ $bad -eq 0 ] && echo "check-examples: --help, unknown options, bad numbers and --json behave"
exit $bad
