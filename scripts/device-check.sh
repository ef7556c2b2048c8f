#!/usr/bin/env bash
# device-check.sh - checks mpar on this machine's OpenCL devices: a GPU with
# its vendor's driver (NVIDIA, AMD, Intel) plus PoCL's CPU device as a second
# platform. It lists what it finds (nvidia-smi, clinfo, every platform and
# device with its driver version, a one-line kernel run on each), gets the
# build dependencies (the system's, or Debian 12 .debs unpacked with dpkg -x
# into a folder of its own: no network, nothing written to /, /etc or /usr),
# writes its own ICD folders and points OCL_ICD_VENDORS at them (never at
# /etc), builds the tests, examples and benches with make, runs the tests on
# the GPU (MPAR_DEVICES=gpu; with a single GPU gpu,cpu, since the tests use
# devices 0 and 1; the tests written for PoCL alone run on PoCL), runs a
# mixed pipeline on GPU + PoCL CPU (MPAR_DEVICES=gpu,cpu: the plan with
# measured layer times, the demo, the benches) and prints the benches'
# `name: value` lines. With no GPU it says so and runs the same steps on
# PoCL alone: two CPU devices with every layer as OpenCL kernels, and two
# PoCL platforms for the mixed run. Each step runs under `timeout` within
# the whole run's time limit. Output and logs: build/device-check/ (log.txt:
# everything; summary.txt; bench.txt; steps/*.txt one per step). Exits 0
# when every step passed, 1 otherwise (2: bad options).
#
# Usage:
#   scripts/device-check.sh [options]                 the check
#   scripts/device-check.sh --download DIR [--with-data]
#       on a machine with Debian 12's archive (amd64 packages; any host
#       architecture): fetch the .debs of scripts/device-check-debs.txt into
#       DIR with `apt-get download` (74 MB; data sets: +33 MB)
#   scripts/device-check.sh --debs DIR --pack FILE.tar.xz
#       one trimmed archive of those .debs (no docs, static libraries, PoCL
#       kernel libraries only for GENERIC/AVX2/AVX-512 CPUs, ...): 56.4 MiB
#       instead of 74 MB of .debs (xz -6; a few minutes on 2 cores), for a
#       machine that takes at most 64 MiB along. --debs accepts a folder
#       holding such an archive in place of (or beside) .debs.
#
# Options of the check:
#   --quick            build only what it runs; 5 device tests (kernels, layers,
#                      pipeline, transfer_hook, faults), the plan with measured
#                      layer times, bench_speed and bench_pipeline (default time
#                      limit 480 s; a few minutes on a 16-core GPU machine)
#   --debs DIR         .deb files and/or *.tar.xz archives made by --pack, used
#                      when the system lacks a build dependency or PoCL
#                      (environment: MPAR_DEBS)
#   --force-unpack     use the unpacked folder even when the system has all
#                      (keeps every unpacked library: to test the --debs path
#                      on a machine that has the packages installed)
#   --time-limit S     the whole run in seconds (default 1800; --quick: 480)
#   --devices SEL      MPAR_DEVICES for the device tests (default: gpu with two
#                      GPUs or more; gpu,cpu with one, since the tests use
#                      devices 0 and 1; cpu without a GPU). A selection with a
#                      comma also sets MPAR_TEST_PLATFORMS=2 (no shared context)
#   --mixed SEL        MPAR_DEVICES for the mixed run (default gpu,cpu; all
#                      without a GPU, over two PoCL platforms)
#   --tests "A B"      the tests to run, names under tests/ (test_kernels ...)
#   --vendor-lib PATH  an OpenCL driver library (an ICD) to add as a platform,
#                      when it is neither in /etc/OpenCL/vendors nor a known
#                      name; repeatable (environment: MPAR_VENDOR_LIBS, with ':')
#   --cpu              ignore the GPU: run the PoCL-only steps
#   --assume-gpu       take the GPU branch without a GPU (to test this script:
#                      with --vendor-lib pointing at another PoCL library and
#                      --devices p0 --mixed p0,p1)
#   --no-werror        build without -Werror (the build retries without it
#                      anyway, and the build step then fails)
#   --repo DIR         the mpar checkout (default: this script's parent folder)
#   --out DIR          output folder (default: REPO/build/device-check)
#   --jobs N           make -j N (default: number of cores)
#   -h, --help         this text
#
# Examples:
#   scripts/device-check.sh --download /tmp/debs                 # networked
#   scripts/device-check.sh --debs /tmp/debs --pack .dc/mpar-root.tar.xz
#   scripts/device-check.sh --quick --debs .dc                   # GPU machine
#   scripts/device-check.sh --quick --debs /tmp/debs --force-unpack   # test here
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$script_dir/.." && pwd)
OUT=""
QUICK=0
DEBS=${MPAR_DEBS:-}
FORCE_UNPACK=0
TIME_LIMIT=""
DEV_SEL=""
MIXED_SEL=""
TESTS_ARG=""
VENDOR_ARGS=()
FORCE_CPU=0
ASSUME_GPU=0
NO_WERROR=0
JOBS=$(nproc 2>/dev/null || echo 2)
DOWNLOAD=""
WITH_DATA=0
PACK=""

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "device-check: $*" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --debs) need_arg "$@"; DEBS=$2; shift ;;
    --force-unpack) FORCE_UNPACK=1 ;;
    --time-limit) need_arg "$@"; TIME_LIMIT=$2; shift ;;
    --devices) need_arg "$@"; DEV_SEL=$2; shift ;;
    --mixed) need_arg "$@"; MIXED_SEL=$2; shift ;;
    --tests) need_arg "$@"; TESTS_ARG=$2; shift ;;
    --vendor-lib) need_arg "$@"; VENDOR_ARGS+=("$2"); shift ;;
    --cpu) FORCE_CPU=1 ;;
    --assume-gpu) ASSUME_GPU=1 ;;
    --no-werror) NO_WERROR=1 ;;
    --repo) need_arg "$@"; REPO=$(cd "$2" && pwd); shift ;;
    --out) need_arg "$@"; OUT=$2; shift ;;
    --jobs) need_arg "$@"; JOBS=$2; shift ;;
    --download) need_arg "$@"; DOWNLOAD=$2; shift ;;
    --with-data) WITH_DATA=1 ;;
    --pack) need_arg "$@"; PACK=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
if [ -n "${MPAR_VENDOR_LIBS:-}" ]; then
  IFS=: read -r -a extra <<<"$MPAR_VENDOR_LIBS"
  VENDOR_ARGS+=("${extra[@]}")
fi
case $TIME_LIMIT in
  "") if [ $QUICK -eq 1 ]; then TIME_LIMIT=480; else TIME_LIMIT=1800; fi ;;
  *[!0-9]*) die "--time-limit takes seconds" ;;
esac
[ -n "$OUT" ] || OUT=$REPO/build/device-check
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEBS_LIST=$script_dir/device-check-debs.txt
LDCONFIG=$(command -v ldconfig || echo /sbin/ldconfig)
MA=$(${CC:-cc} -print-multiarch 2>/dev/null || true)
[ -n "$MA" ] || MA=$(gcc -print-multiarch 2>/dev/null || true)
[ -n "$MA" ] || MA=x86_64-linux-gnu

# ---------------------------------------------------------------- --download
# Fetches the .debs named in device-check-debs.txt (amd64) into DIR.
download_debs() {
  local dir=$1 name class rest
  local pkgs=() apt_opts=()
  command -v apt-get >/dev/null || die "--download needs apt-get (a Debian 12 machine)"
  [ -f "$DEBS_LIST" ] || die "no $DEBS_LIST"
  while read -r name class rest; do
    case $name in ''|'#'*) continue ;; esac
    [ "$class" = data ] && [ $WITH_DATA -eq 0 ] && continue
    pkgs+=("$name:amd64")
  done <"$DEBS_LIST"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(dpkg --print-architecture 2>/dev/null || echo amd64)" != amd64 ]; then
    # another host architecture: a package list of amd64 alone, kept in DIR
    mkdir -p "$dir/.apt-lists/partial"
    apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$dir/.apt-lists")
    apt-get "${apt_opts[@]}" update -qq
  fi
  echo "device-check: downloading ${#pkgs[@]} packages into $dir"
  if ! (cd "$dir" && apt-get "${apt_opts[@]}" download "${pkgs[@]}"); then
    if [ "$(id -u)" -eq 0 ] && [ ${#apt_opts[@]} -eq 0 ]; then
      echo "device-check: apt-get download failed; running apt-get update and trying once more"
      apt-get update -qq
      (cd "$dir" && apt-get download "${pkgs[@]}")
    else
      die "apt-get download failed (run 'apt-get update' as root first?)"
    fi
  fi
  echo "device-check: $(ls "$dir"/*.deb | wc -l) .deb files, $(du -sh "$dir" | cut -f1) in $dir"
}

# ---------------------------------------------------------------- unpacking
# One .deb into a folder: dpkg-deb if there is one, else ar and tar.
deb_extract() {
  local deb=$1 dest=$2 member
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$deb" "$dest"
    return
  fi
  member=$(ar t "$deb" | grep '^data\.tar')
  case $member in
    *.xz) ar p "$deb" "$member" | xz -dc | tar -x -C "$dest" ;;
    *.zst) ar p "$deb" "$member" | zstd -dc | tar -x -C "$dest" ;;
    *.gz) ar p "$deb" "$member" | tar -xz -C "$dest" ;;
    *) ar p "$deb" "$member" | tar -x -C "$dest" ;;
  esac
}

# An archive made by --pack: tar with xz, else Python's tarfile (which reads
# xz without the xz program).
pack_extract() {
  local file=$1 dest=$2
  if tar -xJf "$file" -C "$dest" 2>/dev/null; then return; fi
  command -v python3 >/dev/null || { echo "cannot unpack $file: neither xz nor python3"; return 1; }
  python3 - "$file" "$dest" <<'EOF'
import sys, tarfile
kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}  # our own archive
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], **kw)
EOF
}

# Everything in DIR (.debs and archives) into ROOT, unchanged.
unpack_all() {
  local dir=$1 root=$2 f n=0
  for f in "$dir"/*.deb; do
    [ -e "$f" ] || continue
    deb_extract "$f" "$root" || { echo "cannot unpack $f"; return 1; }
    n=$((n + 1))
  done
  for f in "$dir"/*.tar.xz; do
    [ -e "$f" ] || continue
    pack_extract "$f" "$root" || { echo "cannot unpack $f"; return 1; }
    n=$((n + 1))
  done
  [ $n -gt 0 ] || { echo "no .deb or .tar.xz files in $dir"; return 1; }
  echo "unpacked $n file(s) from $dir into $root"
}

# ---------------------------------------------------------------- --pack
make_pack() {
  local file=$1 tmp bc
  [ -n "$DEBS" ] && [ -d "$DEBS" ] || die "--pack needs --debs DIR with the .debs"
  command -v xz >/dev/null || die "--pack needs xz"
  tmp=$OUT/pack-root
  rm -rf "$tmp"
  mkdir -p "$tmp"
  unpack_all "$DEBS" "$tmp"
  (
    cd "$tmp"
    rm -rf usr/share/doc usr/share/man usr/share/lintian usr/share/bug usr/share/info usr/share/menu
    find . -name '*.a' -delete
    # PoCL links libclang-cpp.so.15 through this symlink's target alone
    find usr/lib/llvm-* -mindepth 1 -maxdepth 1 ! -name lib -exec rm -rf {} + 2>/dev/null || true
    find usr/lib/llvm-*/lib -mindepth 1 -maxdepth 1 ! -name 'libclang-cpp.so*' -exec rm -rf {} + 2>/dev/null || true
    # Debian's PoCL picks a kernel library by the CPU's features; servers
    # have AVX-512 or AVX2; GENERIC runs anywhere
    for bc in usr/share/pocl/kernel-*.bc; do
      [ -e "$bc" ] || continue
      case $bc in *-GENERIC.bc|*-avx2.bc|*-avx512.bc) ;; *) rm -f "$bc" ;; esac
    done
    rm -f usr/lib/*/blis-serial/libblas.so* usr/lib/*/libicui18n.so* usr/lib/*/libicuio.so* \
      usr/lib/*/libicutest.so* usr/lib/*/libicutu.so*
    rm -rf usr/lib/*/pkgconfig usr/lib/*/cmake usr/share/pkgconfig
  )
  mkdir -p "$(dirname "$file")"
  echo "device-check: compressing $(du -sh "$tmp" | cut -f1) into $file (xz -6, a few minutes on 2 cores)"
  tar -C "$tmp" -cf - . | xz -T0 -6 >"$file.part"
  mv "$file.part" "$file"
  rm -rf "$tmp"
  echo "device-check: $(du -h "$file" | cut -f1) $file"
}

if [ -n "$DOWNLOAD" ]; then download_debs "$DOWNLOAD"; exit 0; fi
if [ -n "$PACK" ]; then make_pack "$PACK"; exit 0; fi

# ================================================================ the check
LOG=$OUT/log.txt
STEPS_DIR=$OUT/steps
ROOT=$OUT/root
: >"$LOG"
rm -rf "$STEPS_DIR"
mkdir -p "$STEPS_DIR" "$OUT/bin" "$OUT/cache" "$OUT/pocl-cache"

START=$(date +%s)
DEADLINE=$((START + TIME_LIMIT))
STEP_NAMES=() STEP_STATUS=() STEP_SECS=()
FAILS=0
left() { echo $((DEADLINE - $(date +%s))); }
record() { # NAME STATUS SECONDS
  STEP_NAMES+=("$1") STEP_STATUS+=("$2") STEP_SECS+=("$3")
  case $2 in PASS|SKIP) ;; *) FAILS=$((FAILS + 1)) ;; esac
}
say() { printf '\n==== %s\n' "$*"; }
step_file() { echo "$STEPS_DIR/$(echo "$1" | tr -c 'A-Za-z0-9._=,\n-' '_').txt"; }

# run_step NAME LIMIT CMD... : CMD under timeout (LIMIT, or what is left of
# the run), its output on the terminal and in steps/NAME.txt. Returns CMD's
# status; 124 when it ran out of time.
run_step() {
  local name=$1 limit=$2 t0 rc l
  shift 2
  l=$(($(left) - 5))
  if [ "$l" -lt 10 ]; then
    echo "[$name] not run: the time limit ($TIME_LIMIT s) is reached"
    record "$name" "SKIP-TIME" 0
    return 125
  fi
  [ "$limit" -le "$l" ] || limit=$l
  say "$name (limit ${limit}s)"
  t0=$(date +%s)
  set +e
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$(step_file "$name")"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 0 ]; then
    record "$name" PASS $(($(date +%s) - t0))
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "[$name] TIMED OUT after ${limit}s"
    record "$name" "FAIL-TIMEOUT" $(($(date +%s) - t0))
  else
    echo "[$name] FAILED (exit $rc)"
    record "$name" "FAIL($rc)" $(($(date +%s) - t0))
  fi
  return "$rc"
}

summary() {
  local i
  {
    echo
    echo "==== device-check summary"
    echo "mode: $MODE$([ $QUICK -eq 1 ] && echo ', quick'); dependencies: $DEPS_FROM; repo: $REPO"
    echo "devices: $DEV_LINE"
    for i in "${!STEP_NAMES[@]}"; do
      printf '  %-12s %5ss  %s\n' "${STEP_STATUS[$i]}" "${STEP_SECS[$i]}" "${STEP_NAMES[$i]}"
    done
    [ -z "${TEST_LINE:-}" ] || echo "$TEST_LINE"
    if [ -s "$OUT/bench.txt" ]; then echo "bench lines ($OUT/bench.txt):"; sed 's/^/  /' "$OUT/bench.txt"; fi
    echo "took $(($(date +%s) - START)) s of $TIME_LIMIT; log: $LOG"
    if [ "$FAILS" -eq 0 ]; then echo "device-check: PASSED"; else echo "device-check: FAILED ($FAILS step(s))"; fi
  } | tee "$OUT/summary.txt"
}

# The small device lister (and kernel runner), built against the same
# headers and libOpenCL as mpar.
write_cl_list() {
  cat >"$OUT/cl_list.c" <<'EOF'
/* Every OpenCL platform and device, with driver versions; with --run a
   one-line kernel on each device, checked. Exit 2: no platform; 3: a kernel
   failed. Written by scripts/device-check.sh. */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <stdio.h>
#include <string.h>
static int run_kernel(cl_device_id dev) {
    const char* src = "__kernel void k(__global float* x) { x[get_global_id(0)] = 2.0f * x[get_global_id(0)] + 1.0f; }";
    cl_int st = CL_SUCCESS;
    cl_context c = clCreateContext(NULL, 1, &dev, NULL, NULL, &st);
    cl_command_queue q = NULL;
    cl_program p = NULL;
    cl_kernel k = NULL;
    cl_mem b = NULL;
    float h[256];
    size_t n = 256, i;
    for (i = 0; i < n; i++) h[i] = (float)i;
    if (st == CL_SUCCESS) q = clCreateCommandQueue(c, dev, 0, &st);
    if (st == CL_SUCCESS) p = clCreateProgramWithSource(c, 1, &src, NULL, &st);
    if (st == CL_SUCCESS) st = clBuildProgram(p, 1, &dev, "", NULL, NULL);
    if (st == CL_SUCCESS) k = clCreateKernel(p, "k", &st);
    if (st == CL_SUCCESS) b = clCreateBuffer(c, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, sizeof h, h, &st);
    if (st == CL_SUCCESS) st = clSetKernelArg(k, 0, sizeof b, &b);
    if (st == CL_SUCCESS) st = clEnqueueNDRangeKernel(q, k, 1, NULL, &n, NULL, 0, NULL, NULL);
    if (st == CL_SUCCESS) st = clEnqueueReadBuffer(q, b, CL_TRUE, 0, sizeof h, h, 0, NULL, NULL);
    for (i = 0; st == CL_SUCCESS && i < n; i++)
        if (h[i] != 2.0f * (float)i + 1.0f) st = -9999;
    if (b) clReleaseMemObject(b);
    if (k) clReleaseKernel(k);
    if (p) clReleaseProgram(p);
    if (q) clReleaseCommandQueue(q);
    if (c) clReleaseContext(c);
    return (int)st;
}
int main(int argc, char** argv) {
    cl_platform_id p[32];
    cl_uint np = 0, i, j;
    int ngpu = 0, ncpu = 0, ndev = 0, bad = 0, run = argc > 1 && !strcmp(argv[1], "--run");
    cl_int st = clGetPlatformIDs(32, p, &np);
    if (st != CL_SUCCESS || np == 0) {
        printf("no OpenCL platform (clGetPlatformIDs: %d)\n", (int)st);
        printf("summary: 0 platform(s), 0 device(s), 0 gpu(s), 0 cpu(s)\n");
        return 2;
    }
    for (i = 0; i < np; i++) {
        char name[256] = "", vendor[256] = "", ver[256] = "";
        cl_device_id d[64];
        cl_uint nd = 0;
        clGetPlatformInfo(p[i], CL_PLATFORM_NAME, sizeof name, name, NULL);
        clGetPlatformInfo(p[i], CL_PLATFORM_VENDOR, sizeof vendor, vendor, NULL);
        clGetPlatformInfo(p[i], CL_PLATFORM_VERSION, sizeof ver, ver, NULL);
        printf("platform %u: %s | %s | %s\n", i, name, vendor, ver);
        st = clGetDeviceIDs(p[i], CL_DEVICE_TYPE_ALL, 64, d, &nd);
        if (st != CL_SUCCESS) {
            printf("  no devices (clGetDeviceIDs: %d)\n", (int)st);
            nd = 0;
        }
        for (j = 0; j < nd; j++) {
            char dn[256] = "", dv[256] = "", drv[256] = "";
            cl_device_type t = 0;
            cl_ulong mem = 0, alloc = 0;
            cl_uint cu = 0;
            clGetDeviceInfo(d[j], CL_DEVICE_NAME, sizeof dn, dn, NULL);
            clGetDeviceInfo(d[j], CL_DEVICE_VERSION, sizeof dv, dv, NULL);
            clGetDeviceInfo(d[j], CL_DRIVER_VERSION, sizeof drv, drv, NULL);
            clGetDeviceInfo(d[j], CL_DEVICE_TYPE, sizeof t, &t, NULL);
            clGetDeviceInfo(d[j], CL_DEVICE_GLOBAL_MEM_SIZE, sizeof mem, &mem, NULL);
            clGetDeviceInfo(d[j], CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof alloc, &alloc, NULL);
            clGetDeviceInfo(d[j], CL_DEVICE_MAX_COMPUTE_UNITS, sizeof cu, &cu, NULL);
            printf("  device %d: %s [%s] | %s | driver %s | %u compute units | %.1f GiB (max alloc %.1f GiB)\n", ndev,
                   dn, (t & CL_DEVICE_TYPE_GPU) ? "gpu" : (t & CL_DEVICE_TYPE_CPU) ? "cpu" : "other", dv, drv, cu,
                   (double)mem / 1073741824.0, (double)alloc / 1073741824.0);
            ngpu += (t & CL_DEVICE_TYPE_GPU) != 0;
            ncpu += (t & CL_DEVICE_TYPE_CPU) != 0;
            ndev++;
            if (run) {
                int r = run_kernel(d[j]);
                printf("    kernel build + run + check: %s (%d)\n", r == CL_SUCCESS ? "ok" : "FAILED", r);
                bad += r != CL_SUCCESS;
            }
        }
    }
    printf("summary: %u platform(s), %d device(s), %d gpu(s), %d cpu(s)\n", np, ndev, ngpu, ncpu);
    return bad ? 3 : 0;
}
EOF
}

# A probe that includes and links every build dependency, as mpar's build does.
write_probe() {
  cat >"$OUT/probe.c" <<'EOF'
#define _POSIX_C_SOURCE 200809L /* as mpar.h: blis's cblas.h uses pthread_barrier_t */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <clblast_c.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <zlib.h>
#include <cblas.h>
static void t(void** s) { (void)s; }
int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(t)};
    cl_uint n = 0;
    float x = 1.0f;
    (void)clGetPlatformIDs(0, NULL, &n);
    (void)&CLBlastSgemm;
    (void)zlibVersion();
    (void)cblas_sdot(1, &x, 1, &x, 1);
    return tests[0].test_func == NULL;
}
EOF
}

# libNAME -> absolute path: the given path, then the usual folders, then ldconfig.
resolve_lib() {
  local name=$1 d
  case $name in
    /*) [ -e "$name" ] && { echo "$name"; return 0; }; name=$(basename "$name") ;;
  esac
  local dirs=()
  [ -z "${LD_LIBRARY_PATH:-}" ] || IFS=: read -r -a dirs <<<"$LD_LIBRARY_PATH"
  dirs+=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib "/usr/lib/$MA" "/lib/$MA" "/usr/lib/$MA/nvidia/current"
    /usr/lib64 /usr/lib /usr/local/lib /usr/local/lib64 /opt/rocm/lib /opt/rocm/opencl/lib /opt/intel/opencl/lib64)
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && [ -e "$d/$name" ] && { echo "$d/$name"; return 0; }
  done
  d=$("$LDCONFIG" -p 2>/dev/null | awk -v n="$name" '$1 == n && /x86-64/ {print $NF; exit}')
  [ -n "$d" ] && [ -e "$d" ] && { echo "$d"; return 0; }
  return 1
}

# Whether the system has a library of that file name (for pruning ROOT).
system_has_lib() {
  local name=$1 d
  for d in "/lib/$MA" "/usr/lib/$MA" /lib64 /usr/lib64 /lib /usr/lib; do
    [ -e "$d/$name" ] && return 0
  done
  d=$("$LDCONFIG" -p 2>/dev/null | awk -v n="$name" '$1 == n {print $NF; exit}')
  [ -n "$d" ] && [ -e "$d" ]
}

# Drops from ROOT's library folders the shared libraries the system has
# (its newer versions stay in charge; ROOT adds only what is missing), then
# points dangling development links (libz.so -> libz.so.1.2.13) at the
# system's library. The ICD loader stays: OCL_ICD_VENDORS is ocl-icd's.
prune_root() {
  local d f base target sys cand
  for d in "$ROOT/usr/lib/$MA" "$ROOT/lib/$MA"; do
    [ -d "$d" ] || continue
    for f in "$d"/*.so.*; do
      [ -e "$f" ] || [ -L "$f" ] || continue
      base=$(basename "$f")
      case $base in libOpenCL.so*) continue ;; esac
      if system_has_lib "$base"; then
        rm -f "$f"
        echo "  system has $base: using the system's"
      fi
    done
  done
  fix_dangling
}

fix_dangling() {
  local d f base target sys cand
  for d in "$ROOT/usr/lib/$MA" "$ROOT/lib/$MA"; do
    [ -d "$d" ] || continue
    for f in "$d"/*.so "$d"/*.so.*; do
      [ -L "$f" ] && [ ! -e "$f" ] || continue
      base=$(basename "$f")
      target=$(basename "$(readlink "$f")")
      sys=""
      for cand in "/lib/$MA/$target" "/usr/lib/$MA/$target"; do [ -e "$cand" ] && sys=$cand && break; done
      if [ -z "$sys" ]; then # libz.so: the system's libz.so.1, whatever its full version
        sys=$(ls -1 "/lib/$MA/$base".[0-9]* "/usr/lib/$MA/$base".[0-9]* 2>/dev/null | awk '{print length, $0}' | sort -n | head -1 | cut -d' ' -f2- || true)
      fi
      if [ -n "$sys" ]; then
        ln -sfn "$sys" "$f"
        echo "  $base -> $sys (system)"
      else
        rm -f "$f"
        echo "  $base: dangling, removed"
      fi
    done
  done
}

# ================================================================ main
main() {
  MODE=unknown DEPS_FROM=unknown DEV_LINE="not listed yet"
  echo "device-check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname 2>/dev/null || echo '?'), repo $REPO"
  echo "time limit ${TIME_LIMIT}s$([ $QUICK -eq 1 ] && echo ', quick'); output $OUT"

  # ------------------------------------------------------------ 1. machine
  say "machine"
  uname -a || true
  echo "os: $(sed -n 's/^PRETTY_NAME=//p' /etc/os-release 2>/dev/null | tr -d '"')"
  echo "cores: $(nproc 2>/dev/null || echo '?'); memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo 2>/dev/null)"
  CC=${CC:-cc}
  CXX=${CXX:-c++}
  echo "cc: $(command -v "$CC" >/dev/null && "$CC" --version | head -1 || echo MISSING)"
  echo "c++: $(command -v "$CXX" >/dev/null && "$CXX" --version | head -1 || echo missing: compile-tests skipped)"
  echo "make: $(command -v make >/dev/null && make --version | head -1 || echo 'missing: building with cc directly')"
  local have_nvsmi=0 smi_gpus=0
  if command -v nvidia-smi >/dev/null; then
    have_nvsmi=1
    timeout 30 nvidia-smi || echo "nvidia-smi failed"
    timeout 30 nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null || true
    smi_gpus=$(timeout 30 nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  else
    echo "nvidia-smi: not found"
  fi
  command -v rocm-smi >/dev/null && { timeout 30 rocm-smi || true; }
  echo "ICD files in /etc/OpenCL/vendors:"
  local f
  for f in /etc/OpenCL/vendors/*.icd; do [ -e "$f" ] && echo "  $f: $(head -1 "$f")"; done
  [ -e /etc/OpenCL/vendors ] || echo "  (no /etc/OpenCL/vendors)"

  # ------------------------------------------------------------ 2. dependencies
  say "build dependencies"
  command -v "$CC" >/dev/null || { echo "no C compiler ($CC): the .debs do not bring one"; record deps "FAIL(no cc)" 0; return; }
  write_probe
  write_cl_list
  local sys_blas_dir=/usr/lib/$MA/blis-serial sys_blas_inc=/usr/include/$MA/blis-serial
  local sys_ok=0 sys_pocl="" need_root=0 t0
  t0=$(date +%s)
  if "$CC" -std=c99 -I"$sys_blas_inc" "$OUT/probe.c" -o "$OUT/bin/probe" \
    -lclblast -lOpenCL -lcmocka -lz -lpthread -lm -L"$sys_blas_dir" -Wl,-rpath,"$sys_blas_dir" -lblis \
    >"$OUT/probe-system.txt" 2>&1; then
    sys_ok=1
    echo "system: headers and libraries for the build found"
  else
    echo "system: the build dependencies are incomplete:"
    grep -E 'error|cannot find|No such' "$OUT/probe-system.txt" | head -5 | sed 's/^/  /'
  fi
  for f in /etc/OpenCL/vendors/*.icd; do
    [ -e "$f" ] || continue
    case $(head -1 "$f") in *pocl*) sys_pocl=$(resolve_lib "$(head -1 "$f")" || true) ;; esac
    [ -z "$sys_pocl" ] || break
  done
  [ -n "$sys_pocl" ] || sys_pocl=$(resolve_lib libpocl.so.2 || true)
  echo "system PoCL: ${sys_pocl:-none}"
  if [ $FORCE_UNPACK -eq 1 ]; then
    need_root=1
    echo "--force-unpack: building and running against the unpacked folder"
  elif [ $sys_ok -eq 0 ] || [ -z "$sys_pocl" ]; then
    need_root=1
  fi

  ROOT_USED=0
  if [ $need_root -eq 1 ]; then
    if [ -z "$DEBS" ]; then
      echo "missing dependencies and no --debs DIR: get the packages on a machine with Debian 12's archive:"
      echo "  scripts/device-check.sh --download DIR   (then --debs DIR, or --pack FILE.tar.xz first)"
      if [ $sys_ok -eq 0 ]; then record deps "FAIL(missing)" $(($(date +%s) - t0)); return; fi
      echo "continuing without PoCL: the mixed GPU + CPU run will fail"
    else
      [ -d "$DEBS" ] || { echo "--debs $DEBS: no such folder"; record deps "FAIL(no debs)" 0; return; }
      DEBS=$(cd "$DEBS" && pwd)
      local stamp
      stamp=$(cd "$DEBS" && ls -l --time-style=+%s -- *.deb *.tar.xz 2>/dev/null | awk '{print $5, $6, $7}'; echo "force=$FORCE_UNPACK ma=$MA")
      if [ -f "$ROOT/.stamp" ] && [ "$(cat "$ROOT/.stamp")" = "$stamp" ]; then
        echo "$ROOT: already unpacked from the same files"
      else
        rm -rf "$ROOT"
        mkdir -p "$ROOT"
        if ! unpack_all "$DEBS" "$ROOT"; then
          record deps "FAIL(unpack)" $(($(date +%s) - t0))
          return
        fi
        if [ $FORCE_UNPACK -eq 0 ]; then
          echo "keeping only the libraries this system lacks:"
          prune_root
        else
          fix_dangling
        fi
        echo "$stamp" >"$ROOT/.stamp"
      fi
      ROOT_USED=1
    fi
  fi

  # flags for make and for the lister
  local inc="" ldpre="" blas_dir=$sys_blas_dir blas_inc=$sys_blas_inc
  if [ $ROOT_USED -eq 1 ]; then
    # -isystem, as /usr/include is: -pedantic stays quiet about cmocka.h's macros
    inc="-isystem $ROOT/usr/include -isystem $ROOT/usr/include/$MA"
    ldpre="-L$ROOT/usr/lib/$MA -Wl,-rpath,$ROOT/usr/lib/$MA"
    [ -e "$ROOT/usr/lib/$MA/blis-serial/libblis.so" ] && blas_dir=$ROOT/usr/lib/$MA/blis-serial
    [ -e "$ROOT/usr/include/$MA/blis-serial/cblas.h" ] && blas_inc=$ROOT/usr/include/$MA/blis-serial
    export LD_LIBRARY_PATH="$ROOT/usr/lib/$MA${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    DEPS_FROM="unpacked ($ROOT)"
    [ $FORCE_UNPACK -eq 1 ] && DEPS_FROM="$DEPS_FROM, forced"
  else
    DEPS_FROM="system"
  fi
  MK_CFLAGS="-O2 -g${inc:+ $inc}"
  if [ "$blas_inc" = "$sys_blas_inc" ]; then MK_BLAS="-DMPAR_USE_CBLAS -I$blas_inc"
  else MK_BLAS="-DMPAR_USE_CBLAS -isystem $blas_inc"; fi
  MK_BLAS_DIR=$blas_dir
  MK_LDLIBS="${ldpre:+$ldpre }-lclblast -lOpenCL -lcmocka -lz -lpthread -lm -L$blas_dir -Wl,-rpath,$blas_dir -lblis"
  echo "CFLAGS=$MK_CFLAGS"
  echo "BLAS=$MK_BLAS"
  echo "LDLIBS=$MK_LDLIBS"
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  # shellcheck disable=SC2086
  if ! "$CC" -std=c99 $MK_CFLAGS $MK_BLAS "$OUT/probe.c" -o "$OUT/bin/probe" $MK_LDLIBS >"$OUT/probe.txt" 2>&1; then
    cat "$OUT/probe.txt"
    echo "the build dependencies do not link"
    record deps FAIL $(($(date +%s) - t0))
    return
  fi
  # shellcheck disable=SC2086
  "$CC" -std=c99 -O1 $inc "$OUT/cl_list.c" -o "$OUT/bin/cl_list" ${ldpre} -lOpenCL || echo "the device lister did not build"
  echo "probe: every dependency compiles and links; libraries it loads:"
  ldd "$OUT/bin/probe" | grep -E 'OpenCL|clblast|cmocka|blis|libz\.' | sed 's/^/ /'
  record deps PASS $(($(date +%s) - t0))

  # ------------------------------------------------------------ 3. ICD folders
  say "OpenCL drivers (ICD folders of this run)"
  local pocl_lib="" vendor_libs=() seen=" " lib name icd_dir
  if [ $ROOT_USED -eq 1 ] && [ -e "$ROOT/usr/lib/$MA/libpocl.so.2" ]; then
    pocl_lib=$ROOT/usr/lib/$MA/libpocl.so.2
  else
    pocl_lib=$sys_pocl
  fi
  add_vendor() {
    local l r
    l=$(resolve_lib "$1") || { echo "  $1: not found"; return 0; }
    r=$(readlink -f "$l")
    case $(basename "$l") in *pocl*) return 0 ;; esac
    case "$seen" in *" $r "*) return 0 ;; esac
    seen="$seen$r "
    vendor_libs+=("$l")
    echo "  vendor driver: $l${2:+ ($2)}"
    if ldd "$l" 2>/dev/null | grep -q 'not found'; then
      echo "    missing libraries:"; ldd "$l" | grep 'not found' | sed 's/^/    /'
    fi
  }
  for icd_dir in /etc/OpenCL/vendors /usr/local/etc/OpenCL/vendors /usr/local/nvidia/etc/OpenCL/vendors \
    ${OPENCL_VENDOR_PATH:-} ${OCL_ICD_VENDORS:-}; do
    [ -d "$icd_dir" ] || continue
    case $icd_dir in "$OUT"/*) continue ;; esac
    for f in "$icd_dir"/*.icd; do
      [ -e "$f" ] || continue
      add_vendor "$(head -1 "$f" | tr -d '\r')" "$f"
    done
  done
  for name in libnvidia-opencl.so.1 libamdocl64.so libamdocl-orca64.so libigdrcl.so libintelocl.so; do
    lib=$(resolve_lib "$name" || true)
    [ -z "$lib" ] || add_vendor "$lib" "known name"
  done
  for lib in "${VENDOR_ARGS[@]+"${VENDOR_ARGS[@]}"}"; do add_vendor "$lib" "--vendor-lib"; done
  echo "  PoCL: ${pocl_lib:-none}"
  ICD_MIXED=$OUT/icd-mixed ICD_CPU=$OUT/icd-cpu ICD_CPU2=$OUT/icd-cpu2
  rm -rf "$ICD_MIXED" "$ICD_CPU" "$ICD_CPU2"
  mkdir -p "$ICD_MIXED" "$ICD_CPU" "$ICD_CPU2"
  local i=0
  for lib in "${vendor_libs[@]+"${vendor_libs[@]}"}"; do
    i=$((i + 1))
    echo "$lib" >"$ICD_MIXED/1$i-$(basename "$lib" | sed 's/\.so.*//').icd"
  done
  if [ -n "$pocl_lib" ]; then
    echo "$pocl_lib" >"$ICD_MIXED/90-pocl.icd"
    echo "$pocl_lib" >"$ICD_CPU/pocl.icd"
    echo "$pocl_lib" >"$ICD_CPU2/pocl-a.icd"
    echo "$pocl_lib" >"$ICD_CPU2/pocl-b.icd"
  fi
  for f in "$ICD_MIXED"/*.icd; do [ -e "$f" ] && echo "  $f: $(cat "$f")"; done
  unset OCL_ICD_FILENAMES OPENCL_VENDOR_PATH
  export MPAR_CACHE_DIR=$OUT/cache POCL_CACHE_DIR=$OUT/pocl-cache MPAR_KERNEL_PATH=$REPO/kernels
  unset MPAR_DEVICES MPAR_CPU_ROUTE MPAR_FAULT MPAR_BUILD_OPTIONS POCL_DEVICES MPAR_TEST_PLATFORMS

  # ------------------------------------------------------------ 4. listing
  local ngpu=0 clinfo_bin=""
  command -v clinfo >/dev/null && clinfo_bin=$(command -v clinfo)
  [ -z "$clinfo_bin" ] && [ $ROOT_USED -eq 1 ] && [ -x "$ROOT/usr/bin/clinfo" ] && clinfo_bin=$ROOT/usr/bin/clinfo
  if [ -n "$clinfo_bin" ]; then
    run_step clinfo 60 env OCL_ICD_VENDORS="$ICD_MIXED" POCL_DEVICES=basic bash -c \
      '"$0" -l && { "$0" | grep -E "^ *(Platform Name|Platform Version|Device Name|Device Type|Device Version|Driver Version|Max compute units|Global memory size|Max memory allocation) " || true; }' \
      "$clinfo_bin" || true
  else
    echo "clinfo: not found (add the clinfo .deb); the lister below shows the same"
  fi
  run_step devices 120 env OCL_ICD_VENDORS="$ICD_MIXED" POCL_DEVICES=basic "$OUT/bin/cl_list" --run || true
  ngpu=$(sed -n 's/^summary: .*device(s), \([0-9]*\) gpu(s).*/\1/p' "$(step_file devices)" | tail -1)
  ngpu=${ngpu:-0}
  DEV_LINE=$(grep '^summary:' "$(step_file devices)" | tail -1 | sed 's/^summary: //')
  DEV_LINE=${DEV_LINE:-none listed}
  if [ "$ngpu" -eq 0 ] && [ $ASSUME_GPU -eq 0 ] && { [ ${#vendor_libs[@]} -gt 0 ] || [ "$smi_gpus" -gt 0 ]; }; then
    echo "a GPU driver or nvidia-smi is here but OpenCL shows no GPU; the loader's account:"
    local dbg=$STEPS_DIR/icd-debug.txt
    env OCL_ICD_VENDORS="$ICD_MIXED" POCL_DEVICES=basic OCL_ICD_DEBUG=15 timeout 60 "$OUT/bin/cl_list" >"$dbg" 2>&1 || true
    head -40 "$dbg"
    record "gpu visible to OpenCL" FAIL 0
  fi
  if [ $ASSUME_GPU -eq 1 ] && [ "$ngpu" -eq 0 ]; then
    echo "--assume-gpu: taking the GPU branch with no GPU"
    ngpu=1
  fi
  if [ $FORCE_CPU -eq 1 ] && [ "$ngpu" -gt 0 ]; then
    echo "--cpu: leaving the $ngpu GPU(s) out"
    ngpu=0
  fi
  local dev_env=() pocl_env=() mixed_env=() test_dev mixed_dev
  pocl_env=(OCL_ICD_VENDORS="$ICD_CPU" POCL_DEVICES="basic basic")
  if [ "$ngpu" -gt 0 ]; then
    MODE="gpu ($ngpu GPU(s) + PoCL)"
    # The tests put stages on devices 0 and 1 (some on 2): with one GPU
    # they get the GPU and one PoCL device, on two platforms.
    if [ "$ngpu" -ge 2 ] || [ -z "$pocl_lib" ]; then test_dev=${DEV_SEL:-gpu}; else test_dev=${DEV_SEL:-gpu,cpu}; fi
    mixed_dev=${MIXED_SEL:-gpu,cpu}
    dev_env=(OCL_ICD_VENDORS="$ICD_MIXED" POCL_DEVICES=basic MPAR_DEVICES="$test_dev")
    case $test_dev in *,*) dev_env+=(MPAR_TEST_PLATFORMS=2) ;; esac
    mixed_env=(OCL_ICD_VENDORS="$ICD_MIXED" POCL_DEVICES=basic MPAR_DEVICES="$mixed_dev")
  else
    MODE="cpu (no GPU: PoCL only)"
    echo
    echo "NO GPU FOUND through OpenCL: running the same steps on PoCL's CPU devices:"
    echo "  device tests on POCL_DEVICES='basic basic' with every layer as OpenCL kernels (as on a GPU),"
    echo "  the mixed run on two PoCL platforms, one device each (the mixed-vendor path)"
    test_dev=${DEV_SEL:-cpu}
    mixed_dev=${MIXED_SEL:-all}
    dev_env=(OCL_ICD_VENDORS="$ICD_CPU" POCL_DEVICES="basic basic" MPAR_DEVICES="$test_dev" MPAR_CPU_ROUTE=opencl)
    mixed_env=(OCL_ICD_VENDORS="$ICD_CPU2" POCL_DEVICES=basic MPAR_DEVICES="$mixed_dev")
  fi
  [ -n "$pocl_lib" ] || echo "no PoCL: the PoCL-only tests and the mixed run will fail"
  local fm_dir="" kjv=""
  if [ $ROOT_USED -eq 1 ] && [ -d "$ROOT/usr/share/datasets/fashion-mnist" ]; then fm_dir=$ROOT/usr/share/datasets/fashion-mnist
  elif [ -d /usr/share/datasets/fashion-mnist ]; then fm_dir=/usr/share/datasets/fashion-mnist; fi
  if [ $ROOT_USED -eq 1 ] && [ -e "$ROOT/usr/lib/bible.data" ]; then kjv=$ROOT/usr/lib/bible.data
  elif [ -e /usr/lib/bible.data ]; then kjv=/usr/lib/bible.data; fi
  [ -z "$fm_dir" ] || export FASHION_MNIST_DIR=$fm_dir
  [ -z "$kjv" ] || export KJV_BIBLE_DATA=$kjv

  # ------------------------------------------------------------ 5. build
  # Tests that assume PoCL (two CPU devices, CPU routes, PoCL's memory
  # limit, "gpu matches none") run on PoCL alone; tests with no device run
  # once; the rest run on the selected devices.
  local pocl_only=" test_core test_host_kernels test_plan_memory test_route "
  local no_device=" test_planner test_schedule test_data "
  local tests=() t
  if [ -n "$TESTS_ARG" ]; then
    for t in $TESTS_ARG; do t=${t#tests/}; tests+=("${t%.c}"); done
  elif [ $QUICK -eq 1 ]; then
    tests=(test_kernels test_layers test_pipeline test_transfer_hook test_faults)
  else
    for f in "$REPO"/tests/test_*.c; do t=$(basename "$f" .c); tests+=("$t"); done
  fi
  local targets=() benches=()
  for t in "${tests[@]}"; do targets+=("tests/$t"); done
  if [ $QUICK -eq 1 ]; then
    benches=(bench/bench_speed bench/bench_pipeline)
    targets+=(examples/plan "${benches[@]}")
  else
    for f in "$REPO"/bench/*.c; do benches+=("bench/$(basename "$f" .c)"); done
    for f in "$REPO"/examples/*.c; do targets+=("examples/$(basename "$f" .c)"); done
    targets+=("${benches[@]}")
    command -v "$CXX" >/dev/null && command -v make >/dev/null && targets=(all)
  fi
  local warn="-Wall -Wextra -Werror -pedantic"
  [ $NO_WERROR -eq 0 ] || warn="-Wall -Wextra -pedantic"
  build() { # WARN TARGETS...
    local w=$1
    shift
    if command -v make >/dev/null; then
      # -o deps: scripts/deps.sh would call apt-get; the dependencies are settled above
      make -C "$REPO" -o deps ${MAKE_B:+"$MAKE_B"} -j"$JOBS" CC="$CC" CXX="$CXX" WARN="$w" CFLAGS="$MK_CFLAGS" BLAS="$MK_BLAS" \
        BLAS_DIR="$MK_BLAS_DIR" LDLIBS="$MK_LDLIBS" "$@"
    else
      local tg
      for tg in "$@"; do
        echo "$CC -std=c99 $w $MK_CFLAGS $MK_BLAS -I. $tg.c -o $tg $MK_LDLIBS"
        # shellcheck disable=SC2086
        (cd "$REPO" && "$CC" -std=c99 $w $MK_CFLAGS $MK_BLAS -I. "$tg.c" -o "$tg" $MK_LDLIBS) || return 1
      done
    fi
  }
  export -f build
  export REPO JOBS CC CXX MK_CFLAGS MK_BLAS MK_BLAS_DIR MK_LDLIBS
  local build_limit=900
  [ $QUICK -eq 1 ] && build_limit=420
  # make does not see changed flags: rebuild everything (-B) unless this
  # script built every binary with the same flags
  local sig="$CC|$CXX|$warn|$MK_CFLAGS|$MK_BLAS|$MK_LDLIBS" fresh=1 bin
  local bins=("${targets[@]}")
  if [ "${targets[0]}" = all ]; then
    bins=()
    for f in "$REPO"/tests/test_*.c "$REPO"/examples/*.c "$REPO"/bench/*.c; do bins+=("${f%.c}"); done
  fi
  if [ "$(cat "$OUT/build-flags" 2>/dev/null)" = "$sig" ]; then
    for bin in "${bins[@]}"; do
      bin=${bin#"$REPO"/}
      [ "$REPO/$bin" -nt "$OUT/build-flags" ] || fresh=0
    done
  else
    fresh=0
  fi
  [ $fresh -eq 1 ] && MAKE_B="" || MAKE_B=-B
  export MAKE_B
  if [ -n "$MAKE_B" ]; then
    echo "$sig" >"$OUT/build-flags"
    touch -d '-2 seconds' "$OUT/build-flags"
    echo "building everything anew (make -B): new flags, or binaries this script did not build; kernel caches emptied"
    rm -rf "$OUT/cache" "$OUT/pocl-cache"
    mkdir -p "$OUT/cache" "$OUT/pocl-cache"
  fi
  if ! run_step build "$build_limit" bash -c 'build "$@"' build "$warn" "${targets[@]}"; then
    rm -f "$OUT/build-flags"
    if [ $NO_WERROR -eq 0 ] && [ "$(left)" -gt 60 ] && grep -q 'Werror\|\[-W' "$(step_file build)"; then
      echo "the build failed on warnings: building again without -Werror (the build step stays FAILED)"
      run_step build-no-werror "$build_limit" bash -c 'build "$@"' build "-Wall -Wextra -pedantic" "${targets[@]}" || true
    fi
  fi
  for bin in "tests/${tests[0]}" "${benches[0]}"; do
    [ -x "$REPO/$bin" ] || continue
    echo "libraries $bin loads:"
    ldd "$REPO/$bin" | grep -E 'OpenCL|clblast|cmocka|blis|libz\.' | sed 's/^/ /'
    readelf -d "$REPO/$bin" 2>/dev/null | grep -E 'RUNPATH|RPATH' | sed 's/^/ /' || true
  done

  # ------------------------------------------------------------ 6. tests
  local passed=0 failed=0 notrun=0 where envs rc
  for t in "${tests[@]}"; do
    if [ ! -x "$REPO/tests/$t" ]; then
      echo "tests/$t: not built"
      record "tests/$t" "FAIL(not built)" 0
      failed=$((failed + 1))
      continue
    fi
    if [ "$t" = test_data ] && { [ -z "$fm_dir" ] || [ -z "$kjv" ]; }; then
      echo "tests/test_data: skipped (Fashion-MNIST or the KJV text missing: --download --with-data)"
      record "tests/$t (no data)" SKIP 0
      continue
    fi
    case $no_device in
      *" $t "*) where="no device"; envs=("${pocl_env[@]}") ;;
      *)
        case $pocl_only in
          *" $t "*) where="PoCL"; envs=("${pocl_env[@]}") ;;
          *) where="MPAR_DEVICES=$test_dev"; envs=("${dev_env[@]}") ;;
        esac ;;
    esac
    rc=0
    run_step "tests/$t ($where)" "$([ $QUICK -eq 1 ] && echo 180 || echo 600)" \
      env -C "$REPO" "${envs[@]}" "tests/$t" || rc=$?
    case $rc in
      0) passed=$((passed + 1)) ;;
      125) notrun=$((notrun + 1)) ;;
      *) failed=$((failed + 1)) ;;
    esac
  done
  TEST_LINE="device tests: $passed passed, $failed failed"
  [ $notrun -eq 0 ] || TEST_LINE="$TEST_LINE, $notrun not run (time limit)"
  echo "$TEST_LINE"

  # ------------------------------------------------------------ 7. mixed run
  say "mixed pipeline: MPAR_DEVICES=$mixed_dev"
  : >"$OUT/bench.txt"
  if [ -x "$REPO/examples/plan" ]; then
    run_step "plan on $mixed_dev (measured)" 180 env -C "$REPO" "${mixed_env[@]}" \
      examples/plan --devices "$mixed_dev" --measure || true
  fi
  if [ $QUICK -eq 0 ] && [ -x "$REPO/examples/demo" ]; then
    if [ -n "$fm_dir" ]; then
      run_step "demo on $mixed_dev" 600 env -C "$REPO" "${mixed_env[@]}" examples/demo || true
    else
      echo "examples/demo: skipped (no Fashion-MNIST: --download --with-data)"
      record "demo (no data)" SKIP 0
    fi
  fi
  local b
  for b in "${benches[@]}"; do
    if [ ! -x "$REPO/$b" ]; then record "$b" "FAIL(not built)" 0; continue; fi
    run_step "$b on $mixed_dev" "$([ $QUICK -eq 1 ] && echo 240 || echo 600)" \
      env -C "$REPO" "${mixed_env[@]}" "$b" || true
    {
      echo "# $b (MPAR_DEVICES=$mixed_dev)"
      grep -E '^[A-Za-z0-9_]+: ' "$(step_file "$b on $mixed_dev")" 2>/dev/null || true
    } >>"$OUT/bench.txt"
  done
  if [ "$have_nvsmi" -eq 1 ]; then
    say "nvidia-smi after the run"
    timeout 30 nvidia-smi --query-gpu=index,name,temperature.gpu,utilization.gpu,memory.used,clocks.sm --format=csv 2>/dev/null || true
  fi
}

# main's steps check their own status (run_step, record): called in an ||
# list, a failing command inside it does not end the run before the summary.
check() {
  main || true
  summary
  [ "$FAILS" -eq 0 ]
}
set +e
check 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
exit "$rc"
