#!/usr/bin/env bash
# The test command: set-up, then formatting, lints, every test (real QUIC on
# 127.0.0.1, real TLS, real shaders on the local GPU or lavapipe), the docs,
# the benchmarks compiled so they never rot, and the SDK example run.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh

echo "== adapters" >&2
cargo run --locked --quiet -- info || {
  echo "no GPU adapter: the tests need one (lavapipe counts)" >&2
  exit 1
}
echo "== fmt" >&2
cargo fmt --all --check
echo "== clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests" >&2
cargo test --workspace --locked
echo "== docs" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
echo "== benchmarks compile" >&2
cargo bench --workspace --no-run --locked --profile dev --quiet
echo "== SDK example" >&2
cargo run --locked --quiet --example sdk
