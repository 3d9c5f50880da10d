# cuse-ksm: the 2009 /dev/ksm driver, emulated through CUSE.
#
#   make setup     install system packages (apt), the project (pip, editable,
#                  with the oldest trio it supports) and .venv-trio-newest/
#                  (the project again, with the newest trio it supports)
#   make demo      boot a VM with CUSE, start the daemon, run the short demo
#   make test      host tests, then the integration suite in one VM
#   make test-host lint + tests that need no CUSE, on the oldest and on the
#                  newest trio (with a short `python -m bench` among them)
#   make test-vm   only the VM part, ending with short passes of bench/cuse_c/compare.sh
#                  and bench/cuse_c/kernel_merge.sh
#   make lint      ruff, and mypy --strict (run with the newest trio's type hints)
#   make bench     the scanner against the host kernel's KSM (root, ~4 min)
#   make bench-cuse the request path against a C libfuse3 CUSE server, in the VM (~4 min)
#   make bench-kernel --merge kernel against madvise() on the host kernel's KSM:
#                  time to full merge, REGISTER latency, CPU, in the VM (~9 min)
#   make soak      64 processes hammer the daemon for a minute in the VM (~4 min)
#   make examples  build the historic C programs (examples/*.c) into examples/bin
PYTHON ?= python3
# The VM's kernel (Debian's has cuse.ko), qemu, busybox for virtme-ng's
# initramfs, kmod for modprobe in the guest, libfuse3 headers for pyfuse3,
# and a C toolchain for tests/c.
APT_PACKAGES := linux-image-amd64 qemu-system-x86 busybox-static kmod \
                libfuse3-dev fuse3 pkg-config gcc make libc6-dev procps
# Console scripts (vng, cuse-ksm) land in the interpreter's scripts dir, which
# a pyenv shim may not cover yet on a fresh machine.  The caller's own PATH is
# kept to tell whether `cuse-ksm` is runnable there after `make pip`.
SCRIPTS := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
CALLER_PATH := $(PATH)
export PATH := $(SCRIPTS):$(PATH)

# pyproject.toml gives trio as a range; the host tests run at both ends of it.
# The main environment ($(PYTHON)) gets the floor of the range, read from
# pyproject.toml so that the range is written down once.  NEWEST is a venv
# made from $(PYTHON) with the project installed editable and trio upgraded to
# the newest release the range allows; its stamp is redone when pyproject.toml
# changes.
TRIO_FLOOR = $(shell $(PYTHON) -c 'import re, tomllib; \
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
    print(*[m[1] for d in deps if (m := re.fullmatch(r"trio>=([^,]+),.*", d))])')
NEWEST := .venv-trio-newest
NEWEST_STAMP := $(NEWEST)/.installed
PIP_FLAGS := -q --disable-pip-version-check
PYTEST_HOST := -m pytest -q --ignore=tests/integration tests

.PHONY: setup apt pip newest test test-host test-vm demo lint c-tests selftests examples bench bench-c bench-cuse bench-kernel soak clean

setup: apt pip newest

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing:" $$missing; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } \
	        >/tmp/cuse-ksm-apt.log 2>&1 || { tail -100 /tmp/cuse-ksm-apt.log; exit 1; }; \
	fi

# pip puts the cuse-ksm script into $(SCRIPTS).  With pyenv, what is on PATH
# is pyenv's shims dir, and a shim for a new script only appears at `pyenv
# rehash`; anywhere else, $(SCRIPTS) may simply not be on the caller's PATH.
pip:
	@test -n "$(TRIO_FLOOR)" || { echo "no trio>=X,<Y range in pyproject.toml"; exit 1; }
	$(PYTHON) -m pip install $(PIP_FLAGS) -e '.[test]' 'trio==$(TRIO_FLOOR)'
	@pyenv=$$(env PATH='$(CALLER_PATH)' sh -c 'command -v pyenv' || echo "$${PYENV_ROOT:-$$HOME/.pyenv}/bin/pyenv"); \
	if [ -x "$$pyenv" ]; then "$$pyenv" rehash; fi; \
	if ! env PATH='$(CALLER_PATH)' sh -c 'command -v cuse-ksm' >/dev/null; then \
	    echo "cuse-ksm is installed as $(SCRIPTS)/cuse-ksm, which is not on your PATH;"; \
	    echo "add $(SCRIPTS) to PATH, or run it as: $(PYTHON) -m cuse_ksm"; \
	fi

newest: $(NEWEST_STAMP)

$(NEWEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install $(PIP_FLAGS) --upgrade -e '.[test]' trio
	@touch $@

# mypy runs in $(NEWEST): trio 0.22 ships no type hints (no py.typed), and
# checking against an Any-typed trio would hide every mistake in its use.
# What mypy checks, and how, is in pyproject.toml ([tool.mypy]).
lint: $(NEWEST_STAMP)
	$(PYTHON) -m ruff check cuse_ksm tests examples bench
	$(NEWEST)/bin/python -m mypy

c-tests:
	$(MAKE) -s -C tests/c

selftests:
	$(MAKE) -s -C tests/selftests

# The historic programs: ksmctl, qemu_register, ksmpages (docs/testing.md).
CC ?= cc
EXAMPLES := ksmctl qemu_register ksmpages
EXAMPLE_CFLAGS := -O2 -Wall -Wextra -Werror -Iinclude

examples: $(addprefix examples/bin/,$(EXAMPLES))

examples/bin/%: examples/%.c include/linux/ksm.h
	@mkdir -p examples/bin
	$(CC) $(EXAMPLE_CFLAGS) -o $@ $<

test: test-host test-vm

# Both runs, even when the first fails: which trio a failure needs is the news.
test-host: lint c-tests selftests examples $(NEWEST_STAMP)
	@rc=0; \
	for py in $(PYTHON) $(NEWEST)/bin/python; do \
	    echo "== host tests: $$py, trio $$($$py -c 'import trio; print(trio.__version__)')"; \
	    $$py $(PYTEST_HOST) || rc=1; \
	done; exit $$rc

# The VM run ends with a short pass of bench/cuse_c/compare.sh (1 s a cell,
# tests/vm/bench-cuse-short.sh) and one of bench/cuse_c/kernel_merge.sh
# (16 MiB, tests/vm/bench-kernel-short.sh).  bench-c builds its C programs here, not
# under the VM's software emulation.
test-vm: c-tests selftests examples bench-c
	VM_SHORT_BENCH=1 VM_PASS_ENV=VM_SHORT_BENCH PYTHON=$$(command -v $(PYTHON)) tests/vm/run

bench-c:
	$(MAKE) -s -C bench/cuse_c

demo: c-tests
	PYTHON=$$(command -v $(PYTHON)) tests/vm/run examples/demo.sh

# Figures go to docs/benchmarks.md by hand, with the command; the last line
# printed is the 1 GiB ratio emulator/kernel.
bench:
	$(PYTHON) -m bench

# Both CPU layouts, 10 s per cell; SECONDS_EACH, PROCS and LAYOUTS pass through.
bench-cuse:
	VM_PASS_ENV="SECONDS_EACH PROCS LAYOUTS" PYTHON=$$(command -v $(PYTHON)) tests/vm/run bench/cuse_c/compare.sh

# Issue 12's measurements of --merge kernel (bench/cuse_c/kernel_merge.sh):
# 1 GiB of dup50, 5 rounds, in a 4 GiB VM.  MIB, ROUNDS, PAGES_TO_SCAN,
# SLEEP_US, REGIONS, REGION_PAGES, REG_ROUNDS, EMULATE_ROUNDS (the script's
# header says what they are) and VM_MEMORY pass through.
bench-kernel: bench-c
	VM_PASS_ENV="MIB ROUNDS PAGES_TO_SCAN SLEEP_US MERGE_TIMEOUT REGIONS REGION_PAGES REG_ROUNDS EMULATE_ROUNDS" \
	    PYTHON=$$(command -v $(PYTHON)) tests/vm/run bench/cuse_c/kernel_merge.sh

# The long load test (tests/integration/test_robust_soak.py), never part of
# make test: 64 processes x 3 SMAs x 2 regions for 60 s with the scanner on.
soak: c-tests
	CUSE_KSM_SOAK=1 VM_PASS_ENV="CUSE_KSM_SOAK CUSE_KSM_SOAK_SECONDS" PYTEST_ARGS="-s -k soak" \
	    PYTHON=$$(command -v $(PYTHON)) tests/vm/run

clean:
	$(MAKE) -s -C tests/c clean
	$(MAKE) -s -C tests/robust clean
	$(MAKE) -s -C bench/cuse_c clean
	$(MAKE) -s -C tests/selftests clean
	rm -rf examples/bin
	rm -rf tests/vm/out .pytest_cache .mypy_cache
