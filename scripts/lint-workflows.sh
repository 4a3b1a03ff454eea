#!/usr/bin/env bash
# `make lint-workflows`: actionlint over .github/workflows, and over a workflow with known
# mistakes, which it must reject (a linter that passes everything proves nothing). Uses a native
# `actionlint` where one is installed, else npm's WebAssembly build (scripts/install-actionlint.sh,
# run by `make deps`). Without either it skips, unless VIGIL_REQUIRE_ACTIONLINT=1 (CI).
set -euo pipefail
cd "$(dirname "$0")/.."

linter_dir=$(./scripts/install-actionlint.sh --where)
broken=harness/tests/fixtures/workflows/broken.yml

if command -v actionlint >/dev/null 2>&1; then
  lint() { actionlint "$@"; }
elif [ -f "$linter_dir/main.wasm" ] && command -v node >/dev/null 2>&1; then
  # The build's actionlint (1.6.22) predates the ubuntu-24.04 runners the workflows use.
  lint() { node scripts/actionlint.cjs --linter "$linter_dir" --label ubuntu-24.04 "$@"; }
elif [ "${VIGIL_REQUIRE_ACTIONLINT:-0}" = 1 ]; then
  echo "lint-workflows: VIGIL_REQUIRE_ACTIONLINT=1 but actionlint is not installed (make deps)" >&2
  exit 1
else
  echo "lint-workflows: actionlint is not installed (make deps); skipped (the shape test still runs)"
  exit 0
fi

lint .github/workflows/*.yml
status=0
lint "$broken" >/dev/null || status=$?
if [ "$status" != 1 ]; then
  echo "lint-workflows: actionlint answered $status on $broken, which has mistakes (expected 1)" >&2
  exit 1
fi
echo "lint-workflows: the workflows pass actionlint, which rejects $broken"
