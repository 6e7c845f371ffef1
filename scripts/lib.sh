# Shared by the scripts in this directory: install what the tests and the demo need, only when it is
# missing, so that a second run installs nothing. Sourced, not run.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Test tools built from crates.io live here, outside the checkout, so a fresh clone reuses them.
TOOLS="${NIXPUSH_TOOLS:-/var/cache/nixpush-test-tools}"
S3S_FS_VERSION=0.14.1
export PATH="$TOOLS/bin:$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "run this as root: it installs Debian packages and starts a private nix-daemon" >&2
        exit 2
    fi
}

ensure_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

ensure_rust() {
    if ! command -v cargo >/dev/null; then
        echo "cargo is not installed; this project builds with the machine's Rust toolchain (rustup)" >&2
        exit 2
    fi
    if command -v rustup >/dev/null; then
        for c in rustfmt clippy; do
            rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
        done
    fi
}

ensure_s3s_fs() {
    if [ "$("$TOOLS/bin/s3s-fs" --version 2>/dev/null)" != "s3s-fs $S3S_FS_VERSION" ]; then
        say "building s3s-fs $S3S_FS_VERSION into $TOOLS (a few minutes, once)"
        mkdir -p "$TOOLS"
        cargo install --quiet --locked --root "$TOOLS" "s3s-fs@$S3S_FS_VERSION" --features binary
    fi
}

# Everything the integration tests use: Debian's Nix 2.8 and the S3 server.
ensure_test_deps() {
    need_root
    ensure_apt nix-bin curl
    ensure_rust
    ensure_s3s_fs
}
