# mpar — build, test, demo, benchmarks, sanitizers, install.
#   make          library checks, tests, examples and benchmarks
#   make test     the test suite on two PoCL devices, then on two platforms
#   make demo     a real run on the devices found
#   make bench    every benchmark, one `name: value` per line
#   make check    the tests under AddressSanitizer + UBSan, the executor under
#                 ThreadSanitizer, the pure parts under valgrind
#   make mutate   plant each bug of tests/mutants.txt in a copy of the tree and
#                 run the suites meant to catch it (not in CI: 13-20 minutes)
#   make install PREFIX=/usr/local   the header, kernels, mpar.pc and a CMake
#                 package (find_package(mpar), target mpar::mpar)
#   make uninstall PREFIX=/usr/local removes exactly what install wrote
CC       ?= cc
CXX      ?= c++
PREFIX   ?= /usr/local
CSTD      = -std=c99
WARN      = -Wall -Wextra -Werror -pedantic
CFLAGS   ?= -O2 -g
# The host route for CPU devices (MPAR_USE_CBLAS): BLIS built single-threaded,
# which is safe to call from every stage's worker thread at once (Debian's
# serial OpenBLAS is not: concurrent SGEMMs gave wrong results).
MULTIARCH := $(shell $(CC) -print-multiarch 2>/dev/null)
BLAS_DIR  = /usr/lib/$(MULTIARCH)/blis-serial
BLAS      = -DMPAR_USE_CBLAS -I/usr/include/$(MULTIARCH)/blis-serial
LDLIBS    = -lclblast -lOpenCL -lcmocka -lz -lpthread -lm -L$(BLAS_DIR) -Wl,-rpath,$(BLAS_DIR) -lblis
SAN       = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all

TESTS    := $(patsubst %.c,%,$(wildcard tests/test_*.c))
EXAMPLES := $(patsubst %.c,%,$(wildcard examples/*.c))
BENCHES  := $(patsubst %.c,%,$(wildcard bench/*.c))
HDR      := mpar.h

# Two one-core PoCL devices unless the user chose otherwise.
export POCL_DEVICES ?= basic basic
# Tests write their kernel binary cache here, not into the user's home.
TEST_ENV  = MPAR_CACHE_DIR=$(CURDIR)/build/cache
ICD2      = build/icd2

.PHONY: all deps test test-mpi compile-tests demo bench check mutate install uninstall check-cmake clean clean-tests
all: deps compile-tests $(TESTS) $(EXAMPLES) $(BENCHES)

deps:
	@scripts/deps.sh

tests/%: tests/%.c $(HDR) $(wildcard tests/*.h) | deps
	$(CC) $(CSTD) $(WARN) $(CFLAGS) $(BLAS) -I. $< -o $@ $(LDLIBS)
examples/%: examples/%.c $(HDR) examples/data.h examples/common.h | deps
	$(CC) $(CSTD) $(WARN) $(CFLAGS) $(BLAS) -I. $< -o $@ $(LDLIBS)
bench/%: bench/%.c $(HDR) | deps
	$(CC) $(CSTD) $(WARN) $(CFLAGS) $(BLAS) -I. $< -o $@ $(LDLIBS)
# the realistic case it measures is the one tests/test_synth.c checks
bench/bench_synth: tests/synth_case.h

# The header alone: as C99 (pedantic), as C++, and with MPAR_STATIC.
compile-tests: $(HDR) | deps
	@mkdir -p build
	$(CC) $(CSTD) $(WARN) -I. -c tests/compile/impl.c -o build/impl_c.o
	$(CXX) -Wall -Wextra -Werror -I. -x c++ -c tests/compile/impl.c -o build/impl_cpp.o
	$(CC) $(CSTD) $(WARN) -DMPAR_STATIC -I. -c tests/compile/impl.c -o build/impl_static.o
	$(CC) $(CSTD) $(WARN) -DMPAR_DEBUG -I. -c tests/compile/impl.c -o build/impl_debug.o
	$(CXX) -Wall -Wextra -Werror -DMPAR_DEBUG -I. -x c++ -c tests/compile/impl.c -o build/impl_debug_cpp.o
	$(CC) $(CSTD) $(WARN) -I. -c tests/compile/decl_only.c -o build/decl_only.o
	$(CC) $(CSTD) $(WARN) $(BLAS) -I. -c tests/compile/impl.c -o build/impl_cblas_c.o
	$(CXX) -Wall -Wextra -Werror $(BLAS) -I. -x c++ -c tests/compile/impl.c -o build/impl_cblas_cpp.o
	@if $(CC) $(CSTD) -I. -c tests/compile/wrong_order.c -o build/wrong_order.o 2>build/wrong_order.log; then \
	  echo "compile-tests: a system header before the implementation compiled; it should stop with an #error"; exit 1; \
	elif ! grep -q "include mpar.h before any system header" build/wrong_order.log; then \
	  echo "compile-tests: the wrong include order failed without mpar's #error:"; cat build/wrong_order.log; exit 1; fi
	@echo "compile-tests: C99, C++, MPAR_STATIC, MPAR_DEBUG, declarations-only and MPAR_USE_CBLAS builds are warning-free; a wrong include order stops with mpar's #error"

$(ICD2):
	@mkdir -p $(ICD2)
	@lib=$$(cat /etc/OpenCL/vendors/pocl.icd); echo "$$lib" > $(ICD2)/pocl-a.icd; echo "$$lib" > $(ICD2)/pocl-b.icd

test: all $(ICD2)
	@scripts/run-tests.sh $(TESTS)
	@scripts/check-examples.sh
	@if command -v cmake >/dev/null; then scripts/check-cmake.sh; \
	else echo "CMake package check skipped: no cmake (apt-get install cmake)"; fi
	@if command -v mpicc >/dev/null; then $(MAKE) --no-print-directory test-mpi; \
	else echo "MPI tests skipped: no mpicc (apt-get install openmpi-bin libopenmpi-dev)"; fi

# Stages in separate processes: 2 and 3 ranks on this machine, one PoCL
# device each. mpirun needs the first two flags to run as root on two cores.
# --bind-to none: with 2 ranks Open MPI pins each to one core, so a rank that
# drives two devices ran both stage threads on one core (bench_mpi's
# in-process 2-device step was 1.0x one device). A rank needs a core per
# device it drives; on a bigger machine `--map-by slot:PE=<devices per rank>`
# gives it those (on these 2 cores it binds every rank to both, the same).
MPIRUN = mpirun --allow-run-as-root --oversubscribe --bind-to none
tests/mpi/test_mpi: tests/mpi/test_mpi.c $(HDR) tests/stall_layer.h | deps
	mpicc $(CSTD) $(WARN) $(CFLAGS) $(BLAS) -DMPAR_USE_MPI -I. $< -o $@ $(LDLIBS)
# scripts/kill-test.sh's run across 2 ranks, killed while it saves
tests/mpi/kill_mpi: tests/mpi/kill_mpi.c tests/ckpt_model.h $(HDR) | deps
	mpicc $(CSTD) $(WARN) $(CFLAGS) $(BLAS) -DMPAR_USE_MPI -I. $< -o $@ $(LDLIBS)
bench/mpi/bench_mpi bench/mpi/bench_mpi_wait bench/mpi/bench_mpi_fail: %: %.c $(HDR) | deps
	mpicc $(CSTD) $(WARN) $(CFLAGS) $(BLAS) -DMPAR_USE_MPI -I. $< -o $@ $(LDLIBS)
test-mpi: tests/mpi/test_mpi
	$(TEST_ENV) MPAR_KERNEL_PATH=$(CURDIR)/kernels timeout 300 $(MPIRUN) -np 2 tests/mpi/test_mpi
	$(TEST_ENV) MPAR_KERNEL_PATH=$(CURDIR)/kernels timeout 300 $(MPIRUN) -np 3 tests/mpi/test_mpi

check: deps
	$(MAKE) clean-tests
	$(MAKE) CFLAGS="-O1 -g $(SAN)" $(TESTS) $(ICD2)
	ASAN_OPTIONS=detect_leaks=1 scripts/run-tests.sh $(TESTS)
	$(MAKE) clean-tests
	@mkdir -p build
	$(CC) $(CSTD) $(WARN) -O1 -g -fsanitize=thread $(BLAS) -I. tests/test_pipeline.c -o build/test_pipeline_tsan $(LDLIBS)
	TSAN_OPTIONS=halt_on_error=1 $(TEST_ENV) build/test_pipeline_tsan
	$(CC) $(CSTD) $(WARN) -O1 -g -fsanitize=thread $(BLAS) -I. tests/test_concurrency.c -o build/test_concurrency_tsan $(LDLIBS)
	TSAN_OPTIONS=halt_on_error=1 $(TEST_ENV) build/test_concurrency_tsan
	@# valgrind where the sanitizers are not: the pure parts (PoCL's LLVM JIT
	@# is too slow and too noisy under valgrind for the device tests)
	$(CC) $(CSTD) $(WARN) -O1 -g $(BLAS) -I. tests/test_schedule.c -o build/test_schedule_vg $(LDLIBS)
	$(CC) $(CSTD) $(WARN) -O1 -g $(BLAS) -I. tests/test_planner.c -o build/test_planner_vg $(LDLIBS)
	valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite build/test_schedule_vg
	valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite build/test_planner_vg

demo: all
	examples/demo

mutate: deps
	scripts/mutate.sh

bench: all
	@for b in $(BENCHES); do echo "# $$b"; $(TEST_ENV) $$b || exit 1; done
	@if command -v mpicc >/dev/null; then $(MAKE) --no-print-directory bench/mpi/bench_mpi bench/mpi/bench_mpi_wait bench/mpi/bench_mpi_fail && \
	for b in bench/mpi/bench_mpi bench/mpi/bench_mpi_wait bench/mpi/bench_mpi_fail; do echo "# $$b"; \
	$(TEST_ENV) MPAR_KERNEL_PATH=$(CURDIR)/kernels $(MPIRUN) -np 2 $$b || exit 1; done; fi

# The version the header declares, for mpar.pc and the CMake package.
VERSION   := $(shell sed -n 's/^\#define MPAR_VERSION_STRING "\(.*\)"/\1/p' $(HDR))
VSUBST     = -e 's|@VERSION@|$(VERSION)|g' -e 's|@VERSION_MAJOR@|$(word 1,$(subst ., ,$(VERSION)))|g' \
             -e 's|@VERSION_MINOR@|$(word 2,$(subst ., ,$(VERSION)))|g'
KERNELS   := $(notdir $(wildcard kernels/*.cl))
CMAKEDIR   = $(DESTDIR)$(PREFIX)/lib/cmake/mpar
# What install writes; uninstall removes exactly these, then mpar's own
# folders if empty (the shared ones, include/ and lib/pkgconfig/, stay).
INSTALLED  = $(DESTDIR)$(PREFIX)/include/mpar.h $(DESTDIR)$(PREFIX)/lib/pkgconfig/mpar.pc \
             $(CMAKEDIR)/mparConfig.cmake $(CMAKEDIR)/mparConfigVersion.cmake \
             $(addprefix $(DESTDIR)$(PREFIX)/share/mpar/kernels/,$(KERNELS))

install: $(HDR)
	install -d $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/share/mpar/kernels $(DESTDIR)$(PREFIX)/lib/pkgconfig $(CMAKEDIR)
	sed -e 's|^#define MPAR__INSTALLED_KERNEL_DIR ""|#define MPAR__INSTALLED_KERNEL_DIR "$(PREFIX)/share/mpar/kernels"|' mpar.h > $(DESTDIR)$(PREFIX)/include/mpar.h
	install -m 644 kernels/*.cl $(DESTDIR)$(PREFIX)/share/mpar/kernels/
	sed -e 's|@PREFIX@|$(PREFIX)|g' $(VSUBST) mpar.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/mpar.pc
	sed $(VSUBST) cmake/mparConfig.cmake.in > $(CMAKEDIR)/mparConfig.cmake
	sed $(VSUBST) cmake/mparConfigVersion.cmake.in > $(CMAKEDIR)/mparConfigVersion.cmake

uninstall:
	rm -f $(INSTALLED)
	rmdir $(DESTDIR)$(PREFIX)/share/mpar/kernels $(DESTDIR)$(PREFIX)/share/mpar $(CMAKEDIR) 2>/dev/null || true

# The CMake package from a temporary prefix: find_package, build, run, uninstall.
check-cmake:
	scripts/check-cmake.sh

clean-tests:
	rm -f $(TESTS)
clean:
	rm -rf build $(TESTS) $(EXAMPLES) $(BENCHES) tests/mpi/test_mpi tests/mpi/kill_mpi bench/mpi/bench_mpi bench/mpi/bench_mpi_wait bench/mpi/bench_mpi_fail
