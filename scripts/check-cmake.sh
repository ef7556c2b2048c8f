#!/usr/bin/env bash
# The installed CMake package works and `make uninstall` undoes `make
# install`: installs into a temporary prefix, builds a small CMake project
# elsewhere with find_package(mpar 0.7) and target mpar::mpar, runs it from
# a third folder (so only the installed kernel folder can serve the .cl
# files), then uninstalls and checks that no file is left under the prefix
# and that mpar's own folders are gone. Needs cmake and the OpenCL devices
# the tests use (two PoCL `basic` devices).
#   scripts/check-cmake.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export POCL_DEVICES="${POCL_DEVICES:-basic basic}"
export MPAR_CACHE_DIR="${MPAR_CACHE_DIR:-$top/build/cache}"
unset MPAR_KERNEL_PATH MPAR_DEVICES MPAR_FAULT
work=$(mktemp -d /tmp/mpar-cmake-XXXXXX)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix src=$work/app build=$work/build run=$work/run
mkdir -p "$prefix" "$src" "$build" "$run"
fail() { echo "check-cmake: $*" >&2; exit 1; }

make -s -C "$top" install PREFIX="$prefix" >/dev/null || fail "make install PREFIX=$prefix failed"
for f in include/mpar.h lib/pkgconfig/mpar.pc lib/cmake/mpar/mparConfig.cmake lib/cmake/mpar/mparConfigVersion.cmake; do
  [ -f "$prefix/$f" ] || fail "make install wrote no $f"
done

cat >"$src/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.13)
project(mpar_cmake_check C)
find_package(mpar 0.7 REQUIRED)
add_executable(app main.c)
target_link_libraries(app PRIVATE mpar::mpar)
set_target_properties(app PROPERTIES C_STANDARD 99 C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)
target_compile_options(app PRIVATE -Wall -Wextra -Werror -pedantic)
CM
cat >"$src/main.c" <<'C'
/* A context, a tiny MLP, a two-stage pipeline and one training step. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#define CHECK(call, what)                                                        \
    do {                                                                         \
        if ((call) != MPAR_SUCCESS) {                                            \
            fprintf(stderr, "app: %s: %s\n", what, ctx ? mpar_last_error(ctx) : err.message); \
            return 1;                                                            \
        }                                                                        \
    } while (0)

int main(void) {
    mpar_desc d;
    mpar_error err;
    mpar_context* ctx = NULL;
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_pipeline_desc pd;
    mpar_stage_desc st[2];
    mpar_pipeline* p = NULL;
    mpar_batch b;
    mpar_step_info info;
    float x[8 * 4], out[8 * 3];
    int32_t y[8];
    double loss = 0.0, acc = 0.0;
    int i;
    memset(&d, 0, sizeof d);
    d.error = &err;
    CHECK(mpar_create(&d, &ctx), "mpar_create");
    memset(&md, 0, sizeof md);
    md.input_features = 4, md.seed = 3;
    CHECK(mpar_model_create(&md, &m, &err), "mpar_model_create");
    CHECK(mpar_model_add_linear(m, 8, &err), "linear");
    CHECK(mpar_model_add_simple(m, mpar_layer_relu(), &err), "relu");
    CHECK(mpar_model_add_linear(m, 3, &err), "linear");
    CHECK(mpar_model_add_simple(m, mpar_layer_cross_entropy(), &err), "cross_entropy");
    memset(&pd, 0, sizeof pd);
    st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = 1;
    st[1].device = mpar_device_count(ctx) > 1 ? 1 : 0, st[1].first_layer = 2, st[1].last_layer = 3;
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 2, pd.max_batch = 8;
    CHECK(mpar_pipeline_create(ctx, m, &pd, &p), "mpar_pipeline_create");
    for (i = 0; i < 8 * 4; i++) x[i] = (float)(i % 5) - 2.0f;
    for (i = 0; i < 8; i++) y[i] = i % 3;
    b.inputs = x, b.targets = y, b.samples = 8;
    CHECK(mpar_pipeline_train_step(p, &b, &info), "mpar_pipeline_train_step");
    CHECK(mpar_pipeline_infer(p, &b, out, &loss), "mpar_pipeline_infer");
    CHECK(mpar_accuracy(out, y, 8, 3, &acc, &err), "mpar_accuracy");
    printf("mpar %s: %d device(s), step loss %.4f, loss %.4f, accuracy %.3f\n", MPAR_VERSION_STRING,
           mpar_device_count(ctx), info.loss, loss, acc);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    mpar_destroy(ctx);
    return info.loss > 0.0 && loss > 0.0 ? 0 : 1;
}
C

cmake -S "$src" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" >"$work/cmake.log" 2>&1 ||
  { cat "$work/cmake.log"; fail "cmake could not configure a project using find_package(mpar)"; }
cmake --build "$build" >"$work/build.log" 2>&1 || { cat "$work/build.log"; fail "the project did not build"; }
(cd "$run" && "$build/app") || fail "the app built against the installed package failed"
# a version the package is not: refused
sed -i 's/find_package(mpar 0.7 REQUIRED)/find_package(mpar 1.0 REQUIRED)/' "$src/CMakeLists.txt"
if cmake -S "$src" -B "$work/build1" -DCMAKE_PREFIX_PATH="$prefix" >"$work/cmake1.log" 2>&1; then
  fail "find_package(mpar 1.0) accepted version $(sed -n 's/^set(PACKAGE_VERSION "\(.*\)")/\1/p' "$prefix/lib/cmake/mpar/mparConfigVersion.cmake")"
fi

make -s -C "$top" uninstall PREFIX="$prefix" >/dev/null || fail "make uninstall PREFIX=$prefix failed"
left=$(find "$prefix" -type f -o -type l)
[ -z "$left" ] || fail "make uninstall left files behind: $left"
for dir in share/mpar lib/cmake/mpar; do
  [ ! -e "$prefix/$dir" ] || fail "make uninstall left the folder $dir"
done
echo "check-cmake: find_package(mpar) and mpar::mpar build and run a pipeline from an installed prefix; make uninstall removes every file"
