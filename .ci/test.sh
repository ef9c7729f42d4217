#!/usr/bin/env bash
# The test command: set-up, then formatting, lints, every test (real QUIC on
# 127.0.0.1, real TLS, real shaders on the local GPU or lavapipe), the docs,
# the benchmarks compiled so they never rot, and the SDK example run.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh

if [ "${CI:-}" = "true" ]; then
  # A CI machine builds once, on a disk that may be small: no incremental
  # caches (1.4 GB here) and line tables (enough for backtraces) rather than
  # full debuginfo for the workspace's own crates.
  export CARGO_INCREMENTAL=0
  export CARGO_PROFILE_DEV_DEBUG=line-tables-only
fi

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
