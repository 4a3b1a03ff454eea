# Vigil: build, test and benchmark. `make test` is the one test command (CI runs it).
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build test nightly nightly-suite nightly-verify lint-workflows libvirt-required test-libvirt test-libvirt-all verify-libvirt lint fmt deps bench bench-vm images test-vm fuzz-smoke clean-reports weakened verify-scenarios

all: build

build:
	$(CARGO) build --workspace --all-targets

## Whether libvirt-dev is here (`make deps`): the harness is then built and tested with its
## cargo feature `libvirt`, in the same build as everything else.
HAVE_LIBVIRT := $(shell pkg-config --exists libvirt 2>/dev/null && echo yes)
ifeq ($(HAVE_LIBVIRT),yes)
TEST_FEATURES := --features vigil/libvirt
endif

## The test command: formatting, lints, every crate's tests (the harness's include every
## built-in scenario on the sim backend, through the real binary, the qemu suite and, with
## libvirt, the libvirt suite's core scenarios).
test: lint lint-workflows weakened libvirt-required
	VIGIL_LIBVIRT_SCENARIOS=$(LIBVIRT_CORE_SCENARIOS) $(CARGO) test --workspace --all-targets $(TEST_FEATURES) --no-fail-fast

## Where libvirt is missing the libvirt suite is skipped with the reason, unless
## VIGIL_REQUIRE_LIBVIRT=1 (CI), which makes a skip a failure.
libvirt-required:
	@if [ "$(HAVE_LIBVIRT)" != yes ]; then \
	  if [ "$${VIGIL_REQUIRE_LIBVIRT:-0}" = 1 ]; then \
	    echo "test: VIGIL_REQUIRE_LIBVIRT=1 but libvirt-dev is missing (make deps)" >&2; exit 1; \
	  else \
	    echo "test: libvirt suite skipped: libvirt-dev is not installed (make deps)"; \
	  fi; \
	fi

## The libvirt suite alone: the harness built with the cargo feature `libvirt` (needs
## libvirt-dev and libvirtd from `make deps`).
test-libvirt: libvirt-required
	@if [ "$(HAVE_LIBVIRT)" = yes ]; then \
	  $(CARGO) clippy -p vigil --features libvirt --all-targets -- -D warnings && \
	  $(CARGO) test -p vigil --features libvirt --lib --test libvirt_daemon --test libvirt_guest --test libvirt_migration --test libvirt_snapshot && \
	  VIGIL_LIBVIRT_SCENARIOS=$(LIBVIRT_CORE_SCENARIOS) $(CARGO) test -p vigil --features libvirt --test libvirt_scenarios -- --nocapture; \
	fi

## One built-in scenario per libvirt operation (boot, clone, perfect copy to another host, cold move
## to another CPU, live migration, snapshot and revert, revert with a dongle, hidden hypervisor,
## usbredir hot-plug, USB/IP, terminal-server sessions); `make test-libvirt-all` runs every scenario
## of the qemu suite (~20 min under TCG here).
LIBVIRT_CORE_SCENARIOS = clone-guest,clone-guest-loose,guest-move-other-host,guest-live-migration,snapshot-rollback-units,dongle-units,vm-hidden-hypervisor,dongle-hop,usb-over-ethernet,stationshare-ts-guest
test-libvirt-all: images
	VIGIL_LIBVIRT_SCENARIOS=all $(CARGO) test -p vigil --features libvirt --test libvirt_scenarios -- --nocapture --test-threads 1

## The test-only weakened runtime (one defence off per METER_WEAKEN); never in release artefacts.
weakened:
	$(CARGO) build -p meterd --features weakened --bin meter-weakened

## Every guarded scenario must pass on the full runtime and fail on each weakening it guards;
## the defence × scenario table goes to reports/verdicts.{json,md} and docs/verdicts.md.
verify-scenarios: weakened
	$(CARGO) build -p vigil
	./target/debug/vigil verify --weakened target/debug/meter-weakened --docs docs/verdicts.md

## The same proof on the libvirt backend for the guest scenarios that guard what only a virtual
## machine can attack (copies, moves, hypervisor hiding, reverts, passthrough, USB/IP); the table
## goes to reports/verify-libvirt/verdicts.{json,md}.
LIBVIRT_VERIFY_SCENARIOS = clone-guest guest-move-other-host vm-hidden-hypervisor snapshot-rollback-units dongle-exclusive-guest dongle-hop-cloned-state usb-over-ethernet
verify-libvirt: weakened images
	$(CARGO) build -p vigil --features libvirt
	./target/debug/vigil verify --backend libvirt --weakened target/debug/meter-weakened \
	  --work-dir reports/verify-libvirt/runs --out reports/verify-libvirt $(LIBVIRT_VERIFY_SCENARIOS)

## Nightly (.github/workflows/nightly.yml), one job's part: the built-in scenarios of shard
## NIGHTLY_SHARD (K/N) on NIGHTLY_BACKEND, each run's folder (reports, HTML, JUnit, consoles,
## QEMU command lines) under reports/nightly/<backend>/.
NIGHTLY_BACKEND ?= qemu
NIGHTLY_SHARD ?= 1/1
NIGHTLY_FEATURES = $(if $(filter libvirt,$(NIGHTLY_BACKEND)),--features libvirt)
nightly-suite:
	$(CARGO) build -p vigil $(NIGHTLY_FEATURES)
	./target/debug/vigil suite --backend $(NIGHTLY_BACKEND) --shard $(NIGHTLY_SHARD) \
	  --report-dir reports/nightly/$(NIGHTLY_BACKEND)

## Nightly's proof that the verdicts can fail, on NIGHTLY_BACKEND (sim: every guarded scenario;
## libvirt: those that guard what only a virtual machine can attack).
nightly-verify: weakened
	$(CARGO) build -p vigil $(NIGHTLY_FEATURES)
	./target/debug/vigil verify --backend $(NIGHTLY_BACKEND) --weakened target/debug/meter-weakened \
	  --work-dir reports/nightly/verify-$(NIGHTLY_BACKEND)/runs --out reports/nightly/verify-$(NIGHTLY_BACKEND) \
	  $(if $(filter libvirt,$(NIGHTLY_BACKEND)),$(LIBVIRT_VERIFY_SCENARIOS))

## Every nightly job on this machine, one after another (as root: it installs the packages).
nightly: deps images
	$(MAKE) nightly-suite NIGHTLY_BACKEND=sim NIGHTLY_SHARD=$(NIGHTLY_SHARD)
	$(MAKE) nightly-suite NIGHTLY_BACKEND=qemu NIGHTLY_SHARD=$(NIGHTLY_SHARD)
	$(MAKE) nightly-suite NIGHTLY_BACKEND=libvirt NIGHTLY_SHARD=$(NIGHTLY_SHARD)
	$(MAKE) nightly-verify NIGHTLY_BACKEND=sim
	$(MAKE) nightly-verify NIGHTLY_BACKEND=libvirt

## actionlint on the workflows, which must also reject a workflow with known mistakes
## (scripts/lint-workflows.sh; `make deps` installs it, CI requires it); `make test` checks the
## workflows' shape too (harness/tests/workflows.rs).
lint-workflows:
	./scripts/lint-workflows.sh

## Lints: the default build (what a fresh machine builds), the weakened runtime and, with
## libvirt, the harness with its `libvirt` feature.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p meterd --features weakened --all-targets -- -D warnings
	@if [ "$(HAVE_LIBVIRT)" = yes ]; then \
	  echo "$(CARGO) clippy --workspace --all-targets $(TEST_FEATURES) -- -D warnings"; \
	  $(CARGO) clippy --workspace --all-targets $(TEST_FEATURES) -- -D warnings; \
	fi

fmt:
	$(CARGO) fmt --all

## Debian packages (QEMU 10 from bookworm-backports, busybox, redis). Needs root.
deps:
	./scripts/install-deps.sh

## Benchmarks; every result is JSON in reports/bench/.
bench:
	mkdir -p reports/bench
	$(CARGO) run --release -q -p meter-core --example binding-bench
	$(CARGO) run --release -q -p meter-core --example reconcile-bench
	$(CARGO) run --release -q -p dongle --example dongle-bench
	$(CARGO) run --release -q -p meterd --example server-bench
	$(CARGO) run --release -q -p meterd --features weakened --example server-bench -- --owner-check
	$(CARGO) run --release -q -p meterd --example server-bench -- --rules-log
	$(CARGO) run --release -q -p meterd --example server-bench -- --triad
	./scripts/redis-baseline.sh reports/bench
	$(CARGO) run --release -q -p meterd --example dongle-release-bench
	$(CARGO) run --release -q -p meterd --example triad-bench
	$(CARGO) run --release -q -- bench --out reports/bench

## A short fuzzing run of the dongle frame parser (needs cargo-fuzz: `cargo install cargo-fuzz`).
fuzz-smoke:
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run frame_parser -- -max_total_time=30
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run session_replies -- -max_total_time=15

clean-reports:
	find reports -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

## Guest image for the qemu backend: images/out/{vmlinux,initramfs.cpio,data.qcow2}, cached
## by a hash of its inputs (see images/README.md).
images:
	./scripts/build-image.sh
	./scripts/build-kernel.sh

## The qemu suite: built-in scenarios on real QEMU guests (skips, saying why, without QEMU or images).
test-vm: images
	$(CARGO) test -p vigil --test qemu_scenarios --test usbredir_guest --test usbip_guest -- --nocapture --test-threads 1

## QEMU timings (boot to agent-ready, snapshot, revert, clone, live migration) into reports/bench/vm.json,
## the dongle's USB paths into a guest (usbredir, USB/IP) into reports/bench/usb.json, and where
## libvirt is installed the libvirt backend's timings with their ratios to the qemu backend's of
## the same run into reports/bench/libvirt-vm.json.
bench-vm: images
	mkdir -p reports/bench
	@if pkg-config --exists libvirt 2>/dev/null; then \
	  $(CARGO) test -p vigil --features libvirt --test qemu_bench --test usb_bench -- --nocapture --ignored --test-threads 1; \
	else \
	  $(CARGO) test -p vigil --test qemu_bench --test usb_bench -- --nocapture --ignored --test-threads 1; \
	fi
