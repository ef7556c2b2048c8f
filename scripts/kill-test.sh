#!/usr/bin/env bash
# Crash test for checkpoints: a training run that checkpoints to one path
# after every step is SIGKILLed at a random moment, ROUNDS times (default 25);
# each next run resumes from that checkpoint. After every kill the file at the
# path must load, and hold either the last step the run reported saved or the
# one after it (saved, killed before it could say so): old or new, never
# broken. Exits non-zero otherwise.
# Then the same across processes, when mpicc is there: tests/mpi/kill_mpi
# under `mpirun -np 2` (rank 0 writes the file from both ranks' parts), the
# whole job (mpirun and every rank) killed ROUNDS times; temp files of killed
# runs must not pile up, and a run that ends normally leaves none.
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
MPIRUN="mpirun --allow-run-as-root --oversubscribe --bind-to none"
# start_run LOG: starts one run in the background, sets pid; kill_run: kills it.
start_single() { "$tool" $mode "$ck" >"$1" 2>&1 & pid=$!; }
kill_single() { kill -9 $pid 2>/dev/null; }
# mpirun gives every rank a process group of its own, and a killed mpirun
# leaves its ranks running: the job runs in a session of its own (setsid),
# and every process of that session is killed at once.
start_mpi() { MPAR_KERNEL_PATH="$top/kernels" setsid $MPIRUN -np 2 tests/mpi/kill_mpi "$ck" >"$1" 2>&1 & pid=$!; }
session() { ps -eo pid=,sid= | awk -v s="$pid" '$2 == s { print $1 }'; }
kill_mpi() { local all; all=$(session); [ -n "$all" ] && kill -9 $all 2>/dev/null; }

# rounds NAME: ROUNDS kills of start_NAME's run, each checked.
rounds() {
local name=$1 i t log ms resumed last out rc step n
rm -f "$ck"
bad=0 killed_in_save_loop=0 leftovers=0 prev=0 most=0
start=$(date +%s)
for ((i = 1; i <= rounds; i++)); do
  log=$work/log.$i
  start_$name "$log"
  # Wait until the run has resumed (past start-up), then kill it at a random
  # moment within the next 1.5 s: a step plus a 15 MB save take 0.1-0.15 s,
  # most of it the save, so most kills land inside one.
  for ((t = 0; t < 6000; t++)); do
    grep -qs '^resumed' "$log" && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.01
  done
  if ! grep -qs '^resumed' "$log"; then
    kill_$name; wait $pid; echo "$name round $i: the run did not start:"; cat "$log"; bad=$((bad + 1)); continue
  fi
  ms=$((RANDOM % 1500)); sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
  if ! kill_$name; then echo "$name round $i: the run ended by itself:"; cat "$log"; bad=$((bad + 1)); fi
  wait $pid 2>/dev/null
  for ((t = 0; t < 500; t++)); do [ -z "$(session)" ] && break; sleep 0.01; done # every rank gone
  resumed=$(sed -n 's/^resumed at step //p' "$log")
  last=$(sed -n 's/^saved step //p' "$log" | tail -1)
  [ -n "$last" ] && killed_in_save_loop=$((killed_in_save_loop + 1))
  last=${last:-$resumed}
  if [ ! -e "$ck" ] && [ "$last" = 0 ] && [ -z "$(sed -n 's/^saved step //p' "$log")" ]; then
    echo "$name round $i: killed before the first save (no file yet)"; continue
  fi
  out=$("$tool" verify "$ck" 2>&1); rc=$?
  step=$(echo "$out" | sed -n 's/^step //p')
  if [ $rc -ne 0 ] || [ -z "$step" ]; then
    echo "$name round $i: BROKEN after the kill: $out"; bad=$((bad + 1))
    rm -f "$ck" # start over, so later rounds still test something
    prev=0
  elif [ "$step" != "$last" ] && [ "$step" != $((last + 1)) ]; then
    echo "$name round $i: the file holds step $step, the run had saved $last (neither old nor new)"; bad=$((bad + 1))
  else
    echo "$name round $i: killed after step $last was saved; the file loads, step $step"
    prev=$step
  fi
  n=$(ls -A "$work" | grep -c '^\.mpar-') ; leftovers=$((leftovers + n)); [ $n -gt $most ] && most=$n
  if [ $name = single ]; then
    rm -f "$work"/.mpar-* "$ck".unsafe
  elif [ $n -gt 2 ]; then # the killed run's and, if it died before its first save, the one before's
    echo "$name round $i: $n temp files of killed runs pile up:" "$work"/.mpar-*; bad=$((bad + 1))
  fi
done
echo "kill-test ($name): $rounds kills ($killed_in_save_loop during the save loop), $((rounds - bad)) passed," \
  "$bad failed, final step $prev, $leftovers temp files left by killed runs (at most $most at once)," \
  "$(( $(date +%s) - start )) s"
}

rounds single
failed=$bad
if [ "${KILL_TEST_UNSAFE:-0}" = 1 ]; then
  :
elif ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
  echo "kill-test (mpi): skipped: no mpicc (apt-get install openmpi-bin libopenmpi-dev)"
elif ! make -s tests/mpi/kill_mpi; then
  echo "kill-test (mpi): cannot build tests/mpi/kill_mpi"; failed=$((failed + 1))
else
  rounds mpi
  failed=$((failed + bad))
  # a run that ends by itself removes the leftovers of killed ones and its own
  if ! MPAR_KERNEL_PATH="$top/kernels" timeout 120 $MPIRUN -np 2 tests/mpi/kill_mpi "$ck" 1 >"$work/log.end" 2>&1; then
    echo "kill-test (mpi): the last run failed:"; cat "$work/log.end"; failed=$((failed + 1))
  elif [ -n "$(ls -A "$work" | grep '^\.mpar-')" ]; then
    echo "kill-test (mpi): temp files left after a run that ended normally:" "$work"/.mpar-*; failed=$((failed + 1))
  fi
fi
[ $failed -eq 0 ]
