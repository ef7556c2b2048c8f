#!/usr/bin/env bash
# Crash test for checkpoints: a training run that checkpoints to one path
# after every step is SIGKILLed at a random moment, ROUNDS times (default 25);
# each next run resumes from that checkpoint. After every kill the file at the
# path must load, and hold either the last step the run reported saved or the
# one after it (saved, killed before it could say so): old or new, never
# broken. Exits non-zero otherwise.
#   scripts/kill-test.sh [ROUNDS]
#   KILL_TEST_UNSAFE=1 scripts/kill-test.sh   the negative control: the same
#       run overwriting the file in place, which this test must catch
set -u
rounds=${1:-25}
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 2
export MPAR_CACHE_DIR="${MPAR_CACHE_DIR:-$top/build/cache}"
export POCL_DEVICES="${POCL_DEVICES:-basic basic}"
mkdir -p build
tool=build/ckpt_tool
${CC:-cc} -std=c99 -Wall -Wextra -Werror -pedantic -O2 -g -I. tests/ckpt_tool.c -o "$tool" \
  -lclblast -lOpenCL -lcmocka -lz -lpthread -lm || exit 2
mode=train
[ "${KILL_TEST_UNSAFE:-0}" = 1 ] && mode=train-unsafe
work=$(mktemp -d /tmp/mpar-kill.XXXXXX)
trap 'rm -rf "$work"' EXIT
ck=$work/train.ckpt
bad=0 killed_in_save_loop=0 leftovers=0 prev=0
start=$(date +%s)
for ((i = 1; i <= rounds; i++)); do
  log=$work/log.$i
  "$tool" $mode "$ck" >"$log" 2>&1 &
  pid=$!
  # Wait until the run has resumed (past start-up), then kill it at a random
  # moment within the next 1.5 s: a step plus a 15 MB save take 0.1-0.15 s,
  # most of it the save, so most kills land inside one.
  for ((t = 0; t < 6000; t++)); do
    grep -qs '^resumed' "$log" && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.01
  done
  if ! grep -qs '^resumed' "$log"; then
    wait $pid; echo "round $i: the run did not start:"; cat "$log"; bad=$((bad + 1)); continue
  fi
  ms=$((RANDOM % 1500)); sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
  if ! kill -9 $pid 2>/dev/null; then echo "round $i: the run ended by itself:"; cat "$log"; bad=$((bad + 1)); fi
  wait $pid 2>/dev/null
  resumed=$(sed -n 's/^resumed at step //p' "$log")
  last=$(sed -n 's/^saved step //p' "$log" | tail -1)
  [ -n "$last" ] && killed_in_save_loop=$((killed_in_save_loop + 1))
  last=${last:-$resumed}
  if [ ! -e "$ck" ] && [ "$last" = 0 ] && [ -z "$(sed -n 's/^saved step //p' "$log")" ]; then
    echo "round $i: killed before the first save (no file yet)"; continue
  fi
  out=$("$tool" verify "$ck" 2>&1); rc=$?
  step=$(echo "$out" | sed -n 's/^step //p')
  if [ $rc -ne 0 ] || [ -z "$step" ]; then
    echo "round $i: BROKEN after the kill: $out"; bad=$((bad + 1))
    rm -f "$ck" # start over, so later rounds still test something
    prev=0
  elif [ "$step" != "$last" ] && [ "$step" != $((last + 1)) ]; then
    echo "round $i: the file holds step $step, the run had saved $last (neither old nor new)"; bad=$((bad + 1))
  else
    echo "round $i: killed after step $last was saved; the file loads, step $step"
    prev=$step
  fi
  n=$(ls -A "$work" | grep -c '^\.mpar-') ; leftovers=$((leftovers + n))
  rm -f "$work"/.mpar-* "$ck".unsafe
done
echo "kill-test: $rounds kills ($killed_in_save_loop during the save loop), $((rounds - bad)) passed, $bad failed," \
  "final step $prev, $leftovers temp files left by killed runs, $(( $(date +%s) - start )) s"
[ $bad -eq 0 ]
