# Shared by the scripts in this directory: install what the tests and the demo need, only when it is
# missing, so that a second run installs nothing. Sourced, not run.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Test tools built from crates.io live here, outside the checkout, so a fresh clone reuses them.
TOOLS="${NIXPUSH_TOOLS:-/var/cache/nixpush-test-tools}"
S3S_FS_VERSION=0.14.1
GARAGE_VERSION=2.5.0
MOTO_VERSION=5.2.5
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

ensure_garage() {
    if ! "$TOOLS/bin/garage" --version 2>/dev/null | grep -q "cargo:$GARAGE_VERSION "; then
        say "building Garage $GARAGE_VERSION into $TOOLS (about 11 minutes, once)"
        mkdir -p "$TOOLS"
        cargo install --quiet --locked --root "$TOOLS" "garage@$GARAGE_VERSION"
    fi
}

# moto in a virtualenv of its own; `moto_server` is linked into $TOOLS/bin, and the test bed finds
# the virtualenv's Python (with boto3, a moto dependency) beside the link's target.
ensure_moto() {
    local venv="$TOOLS/moto"
    if [ "$("$venv/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" != "$MOTO_VERSION" ]; then
        say "installing moto $MOTO_VERSION into $venv"
        mkdir -p "$TOOLS"
        python3 -m venv --clear "$venv" 2>/dev/null || { ensure_apt python3-venv; python3 -m venv --clear "$venv"; }
        "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
    fi
    mkdir -p "$TOOLS/bin"
    ln -sfn "$venv/bin/moto_server" "$TOOLS/bin/moto_server"
}

# What the shell test bed below (the demo, the benchmarks) uses: Debian's Nix 2.8 and s3s-fs.
ensure_bed_deps() {
    need_root
    ensure_dev_null
    ensure_apt nix-bin curl python3
    ensure_rust
    ensure_s3s_fs
}

# Everything the integration tests use: the same, the other two S3 servers, and systemd-analyze
# for checking the unit scripts/install.sh writes.
ensure_test_deps() {
    ensure_bed_deps
    ensure_apt systemd
    ensure_garage
    ensure_moto
}

# A test of nixpush up to 0.1.0 ran `keygen ... /dev/null --force` as root, which renamed a regular
# file over the device. With /dev/null a file, cargo's rustc probes read garbage from it and fail.
ensure_dev_null() {
    if [ ! -c /dev/null ]; then
        echo "warning: /dev/null is not a character device; recreating it" >&2
        rm -f /dev/null
        mknod -m 666 /dev/null c 1 3
    fi
}

# --- A private test bed for the demo and the benchmarks (the Rust tests have their own, in
# crates/testbed). Everything lives under $BED and is stopped by `bed_stop` (set as an EXIT trap).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_for() { # wait_for DESCRIPTION COMMAND...: poll a readiness check (servers do not announce it)
    local what="$1"; shift
    for _ in $(seq 1 500); do "$@" 2>/dev/null && return 0; sleep 0.02; done
    echo "$what did not start" >&2; return 1
}

bed_start() { # bed_start DIR: private nix-daemon + SigV4 s3s-fs + anonymous reader
    BED="$1"
    mkdir -p "$BED/conf" "$BED/s3/cache"
    PIDS=()
    cat > "$BED/conf/nix.conf" <<CONF
build-users-group =
sandbox = false
substituters =
experimental-features = nix-command
${BED_EXTRA_CONF:-}
CONF
    export NIX_CONF_DIR="$BED/conf"
    NIX_DAEMON_SOCKET_PATH="$BED/daemon.sock" nix-daemon > "$BED/nix-daemon.log" 2>&1 &
    PIDS+=($!)
    export NIX_REMOTE="unix://$BED/daemon.sock"
    wait_for nix-daemon test -S "$BED/daemon.sock"
    S3_PORT=$(free_port); ANON_PORT=$(free_port)
    export AWS_ACCESS_KEY_ID=nixpush-demo AWS_SECRET_ACCESS_KEY="demo-$RANDOM$RANDOM"
    export AWS_EC2_METADATA_DISABLED=true
    s3s-fs --host 127.0.0.1 --port "$S3_PORT" --access-key "$AWS_ACCESS_KEY_ID" \
        --secret-key "$AWS_SECRET_ACCESS_KEY" "$BED/s3" > "$BED/s3s-fs.log" 2>&1 &
    PIDS+=($!)
    s3s-fs --host 127.0.0.1 --port "$ANON_PORT" "$BED/s3" > "$BED/s3s-fs-anon.log" 2>&1 &
    PIDS+=($!)
    wait_for s3s-fs curl -sf -o /dev/null "http://127.0.0.1:$ANON_PORT/cache/"
    wait_for s3s-fs curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/"
    S3_URL="s3://cache?endpoint=http://127.0.0.1:$S3_PORT&region=us-east-1"
    HTTP_URL="http://127.0.0.1:$ANON_PORT/cache"
}

bed_stop() {
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

build_nixpush() {
    say "building nixpush and nixpush-hook (release)"
    (cd "$REPO" && cargo build --release --locked --quiet --bin nixpush --bin nixpush-hook)
    NIXPUSH="$REPO/target/release/nixpush"
    NIXPUSH_HOOK="$REPO/target/release/nixpush-hook"
}
