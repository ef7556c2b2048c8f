#!/usr/bin/env bash
# Mutation check: do the tests catch plausible bugs?
#
#   scripts/mutate.sh [-l LIST] [-j JOBS] [-t SECONDS] [--no-baseline] [ID...]
#
# Applies each mutant of LIST (default tests/mutants.txt; the format is
# described at the top of that file) to a private copy of the tree under
# build/mutate/<id>/ (the real mpar.h and kernels are never touched), builds
# the test suites the mutant names there, and runs them with a time limit per
# mutant. A failing suite, or one that runs out of time, kills the mutant.
# Prints one line per mutant, then `mutation_kill_rate: X` over the mutants
# not marked equivalent, then every survivor with its reason line.
#
# Exit status: 0 whatever the kill rate (this is a report); non-zero when
# the check itself cannot be trusted: a mutant's original text is not found
# exactly once (the list has rotted), a mutant does not compile, or a suite
# fails on the unmutated tree (the baseline; a failing suite would "kill"
# every mutant).
#
#   -l LIST        mutant list [tests/mutants.txt]
#   -j JOBS        mutants run at once [2: each suite drives two PoCL devices,
#                  so more jobs than cores only make timing tests flaky]
#   -t SECONDS     limit per mutant, builds included [240]
#   --no-baseline  skip the run on the unmutated tree (when iterating)
#   --check        only validate the list (every original found exactly once)
#   ID...          only these mutants (all of them are still validated)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
list=$top/tests/mutants.txt
jobs=2
limit=240
baseline=1
check_only=0
only=()
while (($#)); do
  case $1 in
    -l) list=$2; shift 2 ;;
    -j) jobs=$2; shift 2 ;;
    -t) limit=$2; shift 2 ;;
    --no-baseline) baseline=0; shift ;;
    --check) check_only=1; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    -*) echo "mutate: unknown option $1" >&2; exit 2 ;;
    *) only+=("$1"); shift ;;
  esac
done
[[ $list = /* ]] || list=$PWD/$list
[[ -f $list ]] || { echo "mutate: no mutant list $list" >&2; exit 2; }

work=$top/build/mutate
# The same compiler flags as the Makefile, at -O1 (the builds dominate the
# run time), without -Werror: a mutant that drops a statement may leave an
# unused variable, which is not what is being tested.
CC=${CC:-cc}
multiarch=$($CC -print-multiarch 2>/dev/null || true)
blas_dir=/usr/lib/$multiarch/blis-serial
CFLAGS_M=(-std=c99 -O1 -g0 -DMPAR_USE_CBLAS "-I/usr/include/$multiarch/blis-serial" -I.)
LDLIBS_M=(-lclblast -lOpenCL -lcmocka -lz -lpthread -lm "-L$blas_dir" "-Wl,-rpath,$blas_dir" -lblis)
MPIRUN=(mpirun --allow-run-as-root --oversubscribe)
# Without MPI (as make test, which then skips test-mpi) the mpi suites are
# left out; a mutant with no other suite is reported as skipped.
have_mpi=0
command -v mpicc >/dev/null && command -v mpirun >/dev/null && have_mpi=1
# usable_suites SUITES: those this machine can build and run.
usable_suites() {
  local s out=()
  for s in $1; do [[ $s = mpi* && $have_mpi = 0 ]] || out+=("$s"); done
  echo "${out[*]-}"
}

# ---- parse and validate the list; write one private tree per mutant ----
# Python for this part: multi-line texts and "occurs exactly once" are easy
# to get right there and easy to get wrong in shell.
rm -rf "$work"
mkdir -p "$work"
manifest=$work/manifest.tsv
python3 - "$top" "$list" "$work" "$baseline" "$check_only" "${only[@]+"${only[@]}"}" >"$manifest" <<'PY'
import os, re, shutil, sys

top, listfile, work, baseline, check_only = sys.argv[1:6]
only = set(sys.argv[6:])
KNOWN = {"file", "suites", "env", "reason", "equivalent"}
SUITE = re.compile(r"^(test_[A-Za-z0-9_]+|mpi|mpi3)$")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")

def die(msg):
    sys.stderr.write("mutate: %s\n" % msg)
    sys.exit(2)

def parse(path):
    """[id] header, `key: value` lines, then the texts between the lines
    `--- original`, `--- replacement` and `--- end`, taken verbatim."""
    mutants, cur, block, buf = [], None, None, []
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines, 1):
        if block is not None:
            if line == "--- replacement" and block == "original":
                cur["original"], block, buf = "\n".join(buf), "replacement", []
            elif line == "--- end" and block == "replacement":
                cur["replacement"], block, buf = "\n".join(buf), None, []
            elif line.startswith("--- "):
                die("%s:%d: [%s]: unexpected '%s' inside the %s text" % (path, n, cur["id"], line, block))
            else:
                buf.append(line)
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^\[([A-Za-z0-9_.-]+)\]\s*$", line)
        if m:
            cur = {"id": m.group(1), "line": n}
            mutants.append(cur)
            continue
        if cur is None:
            die("%s:%d: text before the first [id]" % (path, n))
        if line == "--- original":
            if "original" in cur:
                die("%s:%d: [%s] has two originals" % (path, n, cur["id"]))
            block, buf = "original", []
            continue
        m = re.match(r"^([a-z]+):\s*(.*?)\s*$", line)
        if not m or m.group(1) not in KNOWN:
            die("%s:%d: [%s]: expected one of %s, or '--- original'" % (path, n, cur["id"], ", ".join(sorted(KNOWN))))
        cur[m.group(1)] = m.group(2)
    if block is not None:
        die("%s: [%s]: the %s text has no end ('--- replacement' / '--- end')" % (path, cur["id"], block))
    return mutants

mutants = parse(listfile)
seen = set()
for m in mutants:
    i = m["id"]
    if i in seen:
        die("mutant %s: the id is used twice" % i)
    if i == "baseline":
        die("mutant id 'baseline' is taken by the run on the unmutated tree")
    seen.add(i)
    for key in ("file", "reason", "original", "replacement"):
        if key not in m:
            die("mutant %s (line %d): no %s" % (i, m["line"], key))
    if "suites" not in m and "equivalent" not in m:
        die("mutant %s: no suites (only an equivalent mutant may have none)" % i)
    m["suites"] = m.get("suites", "").split()
    for s in m["suites"]:
        if not SUITE.match(s):
            die("mutant %s: suite '%s' is not test_NAME, mpi or mpi3" % (i, s))
        if s.startswith("test_") and not os.path.isfile(os.path.join(top, "tests", s + ".c")):
            die("mutant %s: suite %s has no tests/%s.c" % (i, s, s))
    m["env"] = m.get("env", "").split()
    for e in m["env"]:
        if not ENV.match(e):
            die("mutant %s: env '%s' is not NAME=VALUE" % (i, e))
    if m["original"] == m["replacement"]:
        die("mutant %s: the replacement equals the original" % i)
    if not m["original"].strip():
        die("mutant %s: the original text is empty" % i)
    path = os.path.join(top, m["file"])
    if m["file"] != "mpar.h" and not re.match(r"^kernels/[A-Za-z0-9_]+\.cl$", m["file"]):
        die("mutant %s: file %s is neither mpar.h nor kernels/*.cl" % (i, m["file"]))
    if not os.path.isfile(path):
        die("mutant %s: no file %s" % (i, m["file"]))
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    # overlapping matches count too: "exactly once" means one place to edit
    count, at = 0, text.find(m["original"])
    while at >= 0:
        count += 1
        at = text.find(m["original"], at + 1)
    if count != 1:
        die("mutant %s: its original text occurs %d times in %s (must be exactly once); first line: %r"
            % (i, count, m["file"], m["original"].split("\n")[0]))
    m["mutated"] = text.replace(m["original"], m["replacement"], 1)
if only - seen:
    die("no such mutant: %s" % ", ".join(sorted(only - seen)))

def copy_tree(dest):
    """What the test suites read: the header, the kernels, the tests, the
    example headers that tests include and the scripts tests run
    (test_timeline renders its SVG with scripts/check-svg.sh). Build
    outputs stay behind."""
    os.makedirs(dest)
    shutil.copy2(os.path.join(top, "mpar.h"), dest)
    shutil.copytree(os.path.join(top, "kernels"), os.path.join(dest, "kernels"))
    shutil.copytree(os.path.join(top, "scripts"), os.path.join(dest, "scripts"))
    for sub in ("tests", "tests/mpi", "examples"):
        src = os.path.join(top, sub)
        os.makedirs(os.path.join(dest, sub), exist_ok=True)
        for name in os.listdir(src):
            if name.endswith((".c", ".h")) and os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(dest, sub, name))

if check_only == "1":
    sys.stderr.write("mutate: %d mutants, %d marked equivalent; every original text found exactly once\n"
                     % (len(mutants), sum("equivalent" in m for m in mutants)))
    sys.exit(0)
if baseline == "1":
    copy_tree(os.path.join(work, "baseline"))
for m in mutants:
    if only and m["id"] not in only:
        continue
    kind = "equivalent" if "equivalent" in m else "run"
    if kind == "run":
        dest = os.path.join(work, m["id"])
        copy_tree(dest)
        with open(os.path.join(dest, m["file"]), "w", encoding="utf-8", newline="") as f:
            f.write(m["mutated"])
    clean = lambda s: s.replace("\t", " ").replace("\n", " ")
    print("\t".join([m["id"], kind, " ".join(m["suites"]) or "-", " ".join(m["env"]) or "-",
                     clean(m["reason"]), clean(m.get("equivalent", "-"))]))
PY

((check_only)) && exit 0
mapfile -t rows <"$manifest"
((${#rows[@]})) || { echo "mutate: no mutants selected" >&2; exit 2; }

# ---- building and running the suites of one tree ----

# build_suite DIR SUITE: builds the suite's binary in DIR (log: DIR/build.log).
build_suite() {
  local dir=$1 suite=$2
  if [[ $suite = mpi* ]]; then
    (cd "$dir" && mpicc "${CFLAGS_M[@]}" -DMPAR_USE_MPI tests/mpi/test_mpi.c -o tests/mpi/test_mpi \
      "${LDLIBS_M[@]}") >>"$dir/build.log" 2>&1
  else
    (cd "$dir" && "$CC" "${CFLAGS_M[@]}" "tests/$suite.c" -o "tests/$suite" "${LDLIBS_M[@]}") \
      >>"$dir/build.log" 2>&1
  fi
}

# run_suite DIR SUITE SECONDS ENV...: the suite's exit status (124 or 137:
# out of time). Runs in DIR, where tests find kernels/ and the mutated
# header, with the environment of scripts/run-tests.sh; output to $RUN_LOG
# (default DIR/run.log).
run_suite() {
  local dir=$1 suite=$2 secs=$3; shift 3
  local -a cmd
  if [[ $suite = mpi* ]]; then
    cmd=("${MPIRUN[@]}" -np "$([[ $suite = mpi3 ]] && echo 3 || echo 2)" tests/mpi/test_mpi)
  else
    cmd=("tests/$suite")
  fi
  (cd "$dir" && env POCL_DEVICES="basic basic" MPAR_CACHE_DIR="$dir/cache" \
      MPAR_KERNEL_PATH="$dir/kernels" "$@" timeout -k 10 "$secs" "${cmd[@]}") \
    >>"${RUN_LOG:-$dir/run.log}" 2>&1
}

# A private copy of the kernel binary cache: a mutant in section 3 may write
# broken files there, and those must not reach the next mutant or make test.
fresh_cache() {
  rm -rf "$1/cache"
  if [[ -d $top/build/cache ]]; then cp -r "$top/build/cache" "$1/cache"; else mkdir -p "$1/cache"; fi
}

# run_mutant ID SUITES ENV: writes DIR/result:
#   killed<TAB>how | survived | broken<TAB>why
run_mutant() {
  local id=$1 suites=$2 envs=$3 dir=$work/$1
  local start=$SECONDS s left rc result=survived
  local -a envv=()
  [[ $envs = - ]] || read -r -a envv <<<"${envs//\{top\}/$top}"
  suites=$(usable_suites "$suites")
  if [[ -z $suites ]]; then
    printf 'skipped\tno mpicc/mpirun for its suites\n' >"$dir/result"
    return 0
  fi
  fresh_cache "$dir"
  for s in $suites; do
    if ! build_suite "$dir" "$s"; then
      result="broken	$s does not compile (see build/mutate/$id/build.log)"
      break
    fi
  done
  if [[ $result = survived ]]; then
    for s in $suites; do
      left=$((limit - (SECONDS - start)))
      if ((left < 5)); then result="killed	$s (time-out: the mutant's ${limit} s were used up)"; break; fi
      echo "=== $s ${envv[*]-}" >>"$dir/run.log"
      rc=0
      run_suite "$dir" "$s" "$left" "${envv[@]+"${envv[@]}"}" || rc=$?
      if ((rc == 124 || rc == 137)); then result="killed	$s (time-out after $((SECONDS - start)) s)"; break; fi
      if ((rc != 0)); then result="killed	$s"; break; fi
    done
  fi
  # keep the mutated sources and the logs, not the binaries (MBs each)
  rm -rf "$dir/cache"
  find "$dir/tests" -type f ! -name '*.[ch]' -delete
  printf '%s\n' "$result" >"$dir/result"
}

# At most $jobs background jobs at once.
running=0
throttle() {
  if ((running >= jobs)); then wait -n || true; running=$((running - 1)); fi
  running=$((running + 1))
}

# The unmutated tree, every (suite, env) that some mutant uses: a suite that
# fails here would kill every mutant that names it. Each suite is built once,
# then each (suite, env) runs, $jobs at a time, each writing a status file.
run_baseline() {
  local dir=$work/baseline row id kind suites envs rest s combo n=0 failed=0
  local -A combos=() suites_used=()
  fresh_cache "$dir"
  for row in "${rows[@]}"; do
    IFS=$'\t' read -r id kind suites envs rest <<<"$row"
    [[ $kind = run ]] || continue
    for s in $(usable_suites "$suites"); do combos["$s|$envs"]=1 suites_used[$s]=1; done
  done
  for s in "${!suites_used[@]}"; do
    throttle
    (build_suite "$dir" "$s" && touch "$dir/built.$s") &
  done
  wait; running=0
  for s in "${!suites_used[@]}"; do
    [[ -f $dir/built.$s ]] && continue
    echo "mutate: baseline: $s does not compile (build/mutate/baseline/build.log)" >&2
    return 1
  done
  for combo in "${!combos[@]}"; do
    n=$((n + 1))
    throttle
    (
      s=${combo%%|*} envs=${combo#*|}
      envv=()
      [[ $envs = - ]] || read -r -a envv <<<"${envs//\{top\}/$top}"
      if ! RUN_LOG=$dir/run.$n.log run_suite "$dir" "$s" "$limit" "${envv[@]+"${envv[@]}"}"; then
        echo "$s ${envv[*]-} (log: build/mutate/baseline/run.$n.log)" >"$dir/failed.$n"
      fi
    ) &
  done
  wait; running=0
  for f in "$dir"/failed.*; do
    [[ -e $f ]] || continue
    echo "mutate: baseline: $(cat "$f") fails on the unmutated tree" >&2
    failed=1
  done
  rm -rf "$dir/cache"
  return "$failed"
}

# On Ctrl-C the jobs go too (a suite already started ends at its time limit).
trap 'trap - INT TERM; kill $(jobs -p) 2>/dev/null; exit 130' INT TERM
t0=$SECONDS
if ((baseline)); then
  run_baseline || exit 1
  echo "baseline: every suite passes on the unmutated tree ($((SECONDS - t0)) s)"
fi

# The mutants, $jobs at a time; each job is a subshell writing its result.
for row in "${rows[@]}"; do
  IFS=$'\t' read -r id kind suites envs rest <<<"$row"
  [[ $kind = run ]] || continue
  throttle
  run_mutant "$id" "$suites" "$envs" &
done
wait

# ---- report ----
killed=0 total=0 broken=0 skipped=0
survivors=()
for row in "${rows[@]}"; do
  IFS=$'\t' read -r id kind suites envs reason why <<<"$row"
  if [[ $kind = equivalent ]]; then
    echo "mutant $id: equivalent ($why)"
    continue
  fi
  result=$(cat "$work/$id/result" 2>/dev/null || echo "broken	no result (the job died)")
  how=${result#*	}
  on=""
  [[ $envs = - ]] || on=" [$envs]"
  case $result in
    killed*) killed=$((killed + 1)); total=$((total + 1)); echo "mutant $id: killed by $how$on" ;;
    survived) total=$((total + 1)); survivors+=("$id	$reason"); echo "mutant $id: survived" ;;
    skipped*) skipped=$((skipped + 1)); echo "mutant $id: skipped ($how)" ;;
    *) broken=$((broken + 1)); echo "mutant $id: BROKEN: $how" ;;
  esac
done
if ((total)); then
  rate=$(awk -v k="$killed" -v n="$total" 'BEGIN { printf "%.3f", k / n }')
else
  rate=n/a
fi
echo "mutation_kill_rate: $rate ($killed of $total non-equivalent mutants killed$( ((skipped)) && echo ", $skipped skipped"))"
for s in "${survivors[@]+"${survivors[@]}"}"; do
  echo "survivor ${s%%	*}: ${s#*	}"
done
echo "mutate: $((SECONDS - t0)) s; logs in build/mutate/<id>/"
if ((broken)); then
  echo "mutate: $broken mutant(s) could not be tested: fix the list" >&2
  exit 1
fi
exit 0
