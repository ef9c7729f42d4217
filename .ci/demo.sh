#!/usr/bin/env bash
# The demo: set-up, then a server and a client on loopback with fresh
# certificates, every shipped kernel checked against its CPU reference.
# Extra arguments go to `quasar demo` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh
cargo run --release --locked --quiet -- demo "$@"
