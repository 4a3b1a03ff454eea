# Vigil: build, test and benchmark. `make test` is the one test command (CI runs it).
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build test test-libvirt lint fmt deps bench bench-vm images test-vm fuzz-smoke clean-reports weakened verify-scenarios

all: build

build:
	$(CARGO) build --workspace --all-targets

## The test command: formatting, lints, every crate's tests (the harness's include every
## built-in scenario on the sim backend, through the real binary).
test: lint weakened
	$(CARGO) test --workspace --all-targets --no-fail-fast
	$(MAKE) test-libvirt

## The libvirt suite: the harness built with the cargo feature `libvirt` (needs libvirt-dev and
## libvirtd from `make deps`); skipped with the reason where libvirt is missing, unless
## VIGIL_REQUIRE_LIBVIRT=1 (CI), which makes a skip a failure.
test-libvirt:
	@if pkg-config --exists libvirt 2>/dev/null; then \
	  $(CARGO) clippy -p vigil --features libvirt --all-targets -- -D warnings && \
	  $(CARGO) test -p vigil --features libvirt --lib --test libvirt_daemon --test libvirt_guest --test libvirt_migration --test libvirt_snapshot; \
	elif [ "$${VIGIL_REQUIRE_LIBVIRT:-0}" = 1 ]; then \
	  echo "test-libvirt: VIGIL_REQUIRE_LIBVIRT=1 but libvirt-dev is missing (make deps)" >&2; exit 1; \
	else \
	  echo "test-libvirt: skipped: libvirt-dev is not installed (make deps)"; \
	fi

## The test-only weakened runtime (one defence off per METER_WEAKEN); never in release artefacts.
weakened:
	$(CARGO) build -p meterd --features weakened --bin meter-weakened

## Every guarded scenario must pass on the full runtime and fail on each weakening it guards;
## the defence × scenario table goes to reports/verdicts.{json,md} and docs/verdicts.md.
verify-scenarios: weakened
	$(CARGO) build -p vigil
	./target/debug/vigil verify --weakened target/debug/meter-weakened --docs docs/verdicts.md

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p meterd --features weakened --all-targets -- -D warnings

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
	./scripts/redis-baseline.sh reports/bench
	$(CARGO) run --release -q -p meterd --example dongle-release-bench
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

## The qemu suite: built-in scenarios on real QEMU guests (skips, saying why, without QEMU or images).
test-vm: images
	$(CARGO) test -p vigil --test qemu_scenarios --test usbredir_guest --test usbip_guest -- --nocapture --test-threads 1

## QEMU timings (boot to agent-ready, snapshot, revert, clone, live migration) into reports/bench/vm.json,
## and the dongle's USB paths into a guest (usbredir, USB/IP) into reports/bench/usb.json.
bench-vm: images
	mkdir -p reports/bench
	$(CARGO) test -p vigil --test qemu_bench --test usb_bench -- --nocapture --ignored --test-threads 1
