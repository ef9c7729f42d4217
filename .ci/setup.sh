#!/usr/bin/env bash
# Set-up for a fresh Debian/Ubuntu machine, sourced by .ci/demo.sh and
# .ci/test.sh: a C compiler, the Vulkan loader, Mesa's lavapipe (software
# Vulkan) when no Vulkan driver is installed, and a Rust toolchain if there is
# none. Idempotent: it installs only what is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
ldconfig -p 2>/dev/null | grep 'libvulkan\.so\.1' >/dev/null || missing+=(libvulkan1)
# A GPU driver (NVIDIA, AMD, Intel) registers an ICD; without any, use lavapipe.
if ! compgen -G '/usr/share/vulkan/icd.d/*.json' >/dev/null \
  && ! compgen -G '/etc/vulkan/icd.d/*.json' >/dev/null; then
  missing+=(mesa-vulkan-drivers)
fi
# `quasar bench --plot` draws its text with a TrueType font.
compgen -G '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf' >/dev/null || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" ca-certificates >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing a Rust toolchain with rustup" >&2
    command -v curl >/dev/null 2>&1 || $SUDO apt-get install -y -qq curl >/dev/null
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --profile minimal --component rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# Mesa's window-system code complains on every device creation without it.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "${XDG_RUNTIME_DIR}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi
