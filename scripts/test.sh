#!/usr/bin/env bash
# Installs what the tests need (when missing) and runs the whole test suite against real Nix 2.8 and
# a real S3 server. Run as root on Debian. Extra arguments go to `cargo test`.
source "$(dirname "$0")/lib.sh"
ensure_test_deps
cd "$REPO"
# A full disk shows up as failures far from their cause; say up front how much room there is.
say "disk: $(df -h --output=avail "$REPO" | tail -1 | tr -d ' ') free for target/, $(df -h --output=avail /nix | tail -1 | tr -d ' ') for /nix"
say "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
say "tests"
cargo test --workspace --locked "$@"
