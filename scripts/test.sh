#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the real peers (grpcurl,
# Python grpcio, ...) into .venv, checks formatting and lints, runs the Rust
# unit and integration tests, then the interop tests against the real peers.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements-test.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing test peers into .venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (binaries the interop tests run)"
cargo build --workspace --bins
echo "== cargo nextest"
cargo nextest run --workspace --no-fail-fast
echo "== interop tests (real peers)"
.venv/bin/python -m pytest tests/interop -q -p no:cacheprovider
