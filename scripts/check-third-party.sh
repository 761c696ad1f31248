#!/usr/bin/env bash
# Checks that each patched crate in third_party/ is exactly its crates.io
# release plus its patch: fetches the release with cargo (checksum verified
# against the crates.io index), applies third_party/NAME.patch and compares
# the trees. Any other difference fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for crate in h2; do
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' "third_party/$crate/Cargo.toml" | head -n1)
  # A throwaway package outside the workspace, so [patch.crates-io] does not
  # apply and cargo fetches the release itself.
  mkdir -p "$work/fetch-$crate/src"
  : > "$work/fetch-$crate/src/lib.rs"
  cat > "$work/fetch-$crate/Cargo.toml" <<TOML
[package]
name = "fetch-$crate"
version = "0.0.0"
edition = "2024"

[dependencies]
$crate = "=$version"
TOML
  (cd "$work/fetch-$crate" && cargo fetch --quiet)
  source=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$crate-$version" | head -n1)
  cp -r "$source" "$work/$crate"
  # Files cargo adds when it unpacks, and ones the vendored copy leaves out.
  rm -rf "$work/$crate/.cargo-ok" "$work/$crate/.github" "$work/$crate/Cargo.lock"
  patch --quiet -p1 -d "$work/$crate" < "third_party/$crate.patch"
  if ! diff -r "$work/$crate" "$root/third_party/$crate"; then
    echo "third_party/$crate differs from $crate $version plus third_party/$crate.patch (see above)" >&2
    exit 1
  fi
  echo "third_party/$crate is $crate $version from crates.io plus third_party/$crate.patch"
done
