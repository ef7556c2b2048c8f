#!/usr/bin/env bash
# Builds every libFuzzer target in tests/fuzz/ and runs each for SECONDS
# (default 60) on a seed corpus of real files, under ASan + UBSan.
# Exits non-zero on any finding (crash, sanitizer report, leak, timeout);
# the input that caused it is kept in build/fuzz/<target>/artifacts/.
#   scripts/fuzz.sh [SECONDS]
set -u
secs=${1:-60}
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 2
export MPAR_CACHE_DIR="${MPAR_CACHE_DIR:-$top/build/cache}"
export POCL_DEVICES="${POCL_DEVICES:-basic basic}"
libs="-lclblast -lOpenCL -lpthread -lm"
failed=0
for src in tests/fuzz/fuzz_*.c; do
  name=$(basename "$src" .c)
  out=build/fuzz/$name
  mkdir -p "$out/corpus" "$out/artifacts"
  echo "=== $name: build"
  clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I. "$src" -o "$out/$name" $libs ||
    { failed=$((failed + 1)); continue; }
  case $name in
    fuzz_checkpoint) # real checkpoints from a pipeline, written by the helper
      ${CC:-cc} -std=c99 -Wall -Wextra -Werror -pedantic -O2 -I. tests/ckpt_tool.c -o build/ckpt_tool \
        -lclblast -lOpenCL -lcmocka -lz -lpthread -lm &&
        build/ckpt_tool seed "$out/corpus" || { echo "$name: could not write the seed corpus"; failed=$((failed + 1)); continue; } ;;
    fuzz_devices|fuzz_plan|fuzz_schedule|fuzz_digest|fuzz_tmpname) # the target writes its own seeds (valid
      # selections; plans from mpar_plan_create; every generator's lists; valid rank records; paths and
      # temporary-file names)
      MPAR_FUZZ_SEEDS="$out/corpus" "$out/$name" ||
        { echo "$name: could not write the seed corpus"; failed=$((failed + 1)); continue; } ;;
  esac
  echo "=== $name: run ${secs} s on $(ls "$out/corpus" | wc -l) corpus files"
  if ! "$out/$name" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$out/artifacts/" "$out/corpus" >"$out/log" 2>&1; then
    tail -40 "$out/log"; echo "$name: FINDING (see $out/artifacts/)"; failed=$((failed + 1)); continue
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb|^Done" "$out/log"
  grep -E "cov: [0-9]+" "$out/log" | tail -1
done
echo "fuzz: $failed target(s) with findings or build failures"
[ $failed -eq 0 ]
