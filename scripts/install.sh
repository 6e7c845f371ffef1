#!/usr/bin/env bash
# Installs nixpush on a builder: the two binaries, the systemd unit, a commented configuration (never
# replacing one), the state directory, shell completions and man pages. Run it again to upgrade: it
# changes only what differs. `--uninstall` removes what it installed and keeps the configuration and
# the queue.
#
# Usage: scripts/install.sh [--prefix DIR] [--from DIR] [--user NAME] [--uninstall]
#   --prefix DIR  where bin/ and share/ go (default /usr/local). With /usr/local or /usr, the
#                 configuration goes to /etc/nixpush, the queue to /var/lib/nixpush and the unit to
#                 /etc/systemd/system; with any other prefix, all of them go under DIR (etc/nixpush,
#                 var/lib/nixpush, lib/systemd/system), and the configuration and unit point there.
#   --from DIR    take nixpush and nixpush-hook from DIR instead of building them
#                 (`cargo build --release --locked`).
#   --user NAME   run the daemon as NAME (an existing system user, never a nixbld build user): the
#                 unit gets User= and Group=, and the queue and GC-root directories are NAME's.
#                 The hook still runs as root; what it creates there is given to NAME.
#   --uninstall   remove the files a previous run installed (listed in PREFIX/share/nixpush/installed).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,18s/^# \{0,1\}//p' "$0"; exit 2; }
fail() { echo "install.sh: $*" >&2; exit 2; }

PREFIX=/usr/local FROM="" UNINSTALL="" RUN_AS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || fail "--prefix needs a directory"; PREFIX="$2"; shift 2 ;;
        --from) [ $# -ge 2 ] || fail "--from needs a directory"; FROM="$2"; shift 2 ;;
        --user) [ $# -ge 2 ] || fail "--user needs a user name"; RUN_AS="$2"; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage ;;
        *) fail "unknown argument \`$1\` (see --help)" ;;
    esac
done
# One spelling per place (`./x`, `/usr/local/`, `/usr//local`), so that the unit and the
# configuration name it plainly and a system prefix is recognised.
PREFIX=$(realpath -m -- "$PREFIX")
[ "$PREFIX" != / ] || fail "--prefix / would put bin/ and share/ at the root; use /usr or /usr/local"

if [ "$PREFIX" = /usr/local ] || [ "$PREFIX" = /usr ]; then
    ETC=/etc/nixpush STATE=/var/lib/nixpush UNIT_DIR=/etc/systemd/system PRIVATE=""
else
    ETC="$PREFIX/etc/nixpush" STATE="$PREFIX/var/lib/nixpush" UNIT_DIR="$PREFIX/lib/systemd/system" PRIVATE=1
fi
if [ -n "$RUN_AS" ]; then
    id -u "$RUN_AS" > /dev/null 2>&1 || fail "user \`$RUN_AS\` does not exist (create a system user first, e.g. useradd --system $RUN_AS)"
    # Nix hands build users to builds: a daemon running as one shares its uid with untrusted build
    # code, which could then rewrite the queue or read the credentials.
    case " $(id -nG "$RUN_AS") " in
        *" nixbld "*) fail "user \`$RUN_AS\` is a Nix build user (group nixbld); run the daemon as a user of its own" ;;
    esac
    [ "$(id -u "$RUN_AS")" != 0 ] || fail "--user $RUN_AS is root; leave --user out to run the daemon as root"
    RUN_GROUP=$(id -gn "$RUN_AS")
fi
BIN="$PREFIX/bin"
SHARE="$PREFIX/share"
MANIFEST="$SHARE/nixpush/installed"

say() { printf '==> %s\n' "$*"; }

if [ -n "$UNINSTALL" ]; then
    [ -f "$MANIFEST" ] || fail "nothing to uninstall: $MANIFEST does not exist"
    # Nix stops building when its post-build-hook is missing.
    for conf in "${NIX_CONF_DIR:-/etc/nix}/nix.conf" /etc/nix/nix.conf; do
        if grep -qs "^[[:space:]]*post-build-hook[[:space:]]*=[[:space:]]*$BIN/nixpush-hook" "$conf"; then
            fail "$conf still sets post-build-hook = $BIN/nixpush-hook: remove that line and restart nix-daemon first (Nix stops building when its hook is missing)"
        fi
    done
    if [ -z "$PRIVATE" ] && command -v systemctl > /dev/null && systemctl is-enabled --quiet nixpush-daemon 2>/dev/null; then
        systemctl disable --now nixpush-daemon || fail "cannot stop and disable nixpush-daemon"
    fi
    kept=()
    while IFS= read -r f; do
        [ -n "$f" ] || continue
        if rm -f -- "$f"; then echo "removed $f"; else kept+=("$f"); fi
    done < "$MANIFEST"
    if [ "${#kept[@]}" -gt 0 ]; then
        # Keep track of what is still there, so that a later --uninstall can finish.
        printf '%s\n' "${kept[@]}" > "$MANIFEST"
        fail "could not remove ${#kept[@]} file(s), still listed in $MANIFEST"
    fi
    rm -f "$MANIFEST"
    rmdir "$SHARE/nixpush" 2>/dev/null || true
    # Roots of items still queued would keep their paths from garbage collection for good.
    if [ -z "$PRIVATE" ] && [ -d /nix/var/nix/gcroots/nixpush ]; then
        rm -rf /nix/var/nix/gcroots/nixpush && echo "removed the GC roots of queued items (/nix/var/nix/gcroots/nixpush)"
    fi
    say "kept the configuration ($ETC) and the queue ($STATE)"
    exit 0
fi

if [ -z "$FROM" ]; then
    command -v cargo > /dev/null || fail "cargo is not installed; build elsewhere and pass --from DIR"
    say "building nixpush and nixpush-hook (cargo build --release --locked)"
    (cd "$REPO" && cargo build --release --locked --quiet --bin nixpush --bin nixpush-hook)
    FROM="$REPO/target/release"
fi
for b in nixpush nixpush-hook; do
    [ -x "$FROM/$b" ] || fail "$FROM/$b is missing or not executable"
done
mkdir -p "$BIN" "$SHARE/nixpush" || fail "cannot create directories under $PREFIX (run as root for a system prefix)"

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
INSTALLED=()
CHANGED=0
# put SOURCE DEST MODE: install SOURCE as DEST unless DEST already has these bytes and this mode.
put() {
    local src="$1" dest="$2" mode="$3"
    INSTALLED+=("$dest")
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
        return
    fi
    # A new file renamed over the old one: nix-daemon may start the hook at any moment, and a file
    # rewritten in place fails to start (ETXTBSY) or starts half-written.
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$src" "$dest.new.$$"
    mv -f "$dest.new.$$" "$dest"
    echo "installed $dest"
    CHANGED=$((CHANGED + 1))
}

put "$FROM/nixpush" "$BIN/nixpush" 755
put "$FROM/nixpush-hook" "$BIN/nixpush-hook" 755
NIXPUSH="$BIN/nixpush"

# The unit runs the installed binary; with a private prefix it also names the configuration there.
sed "s|/usr/local/bin/nixpush|$BIN/nixpush|g" "$REPO/contrib/nixpush-daemon.service" > "$STAGE/unit"
if [ -n "$PRIVATE" ]; then
    sed -i "s|^Environment=NIXPUSH_LOG=info$|&\nEnvironment=NIXPUSH_CONFIG=$ETC/nixpush.toml|" "$STAGE/unit"
fi
if [ -n "$RUN_AS" ]; then
    sed -i "s|^# User=.*$|User=$RUN_AS|; s|^# Group=.*$|Group=$RUN_GROUP|" "$STAGE/unit"
fi
put "$STAGE/unit" "$UNIT_DIR/nixpush-daemon.service" 644

"$NIXPUSH" generate complete-bash > "$STAGE/bash"
"$NIXPUSH" generate complete-zsh > "$STAGE/zsh"
"$NIXPUSH" generate complete-fish > "$STAGE/fish"
put "$STAGE/bash" "$SHARE/bash-completion/completions/nixpush" 644
put "$STAGE/zsh" "$SHARE/zsh/site-functions/_nixpush" 644
put "$STAGE/fish" "$SHARE/fish/vendor_completions.d/nixpush.fish" 644
"$NIXPUSH" generate man --dir "$STAGE/man"
for page in "$STAGE"/man/*.1; do
    put "$page" "$SHARE/man/man1/$(basename "$page")" 644
done

# The configuration is the operator's: written once, never replaced, never uninstalled.
if [ -e "$ETC/nixpush.toml" ] && [ ! -f "$ETC/nixpush.toml" ]; then
    fail "$ETC/nixpush.toml exists but is not a regular file"
fi
if [ ! -e "$ETC/nixpush.toml" ]; then
    mkdir -p "$ETC"
    {
        "$NIXPUSH" daemon --print-config-example
        if [ -n "$PRIVATE" ]; then
            # GC roots live where Nix looks for them, outside any prefix: a private install
            # keeps none unless told where.
            printf '\n# Set by scripts/install.sh --prefix %s:\nstate-dir = "%s"\ngc-roots-dir = ""\n' "$PREFIX" "$STATE"
        fi
    } > "$STAGE/config"
    install -m 644 "$STAGE/config" "$ETC/nixpush.toml"
    echo "installed $ETC/nixpush.toml (commented example: set \`to\` and \`secret-key-files\`)"
    CHANGED=$((CHANGED + 1))
fi
# The queue: written by the hook (root, under nix-daemon) and the daemon; readable by `nixpush status`.
if [ ! -d "$STATE" ]; then
    install -d -m 755 "$STATE"
    echo "created $STATE"
    CHANGED=$((CHANGED + 1))
fi
# The GC roots of queued items: the unit's ProtectSystem=strict leaves the daemon this directory of
# /nix writable only if it exists when the daemon starts.
if [ -z "$PRIVATE" ] && [ ! -d /nix/var/nix/gcroots/nixpush ]; then
    install -d -m 755 /nix/var/nix/gcroots/nixpush
    echo "created /nix/var/nix/gcroots/nixpush"
    CHANGED=$((CHANGED + 1))
fi
if [ -n "$RUN_AS" ]; then
    # The daemon writes the queue and removes GC roots; the hook (root) gives it what it creates.
    owned=("$STATE")
    [ -n "$PRIVATE" ] || owned+=(/nix/var/nix/gcroots/nixpush)
    for d in "${owned[@]}"; do
        mkdir -p "$d"
        if [ "$(stat -c %U:%G "$d")" != "$RUN_AS:$RUN_GROUP" ]; then
            chown -R "$RUN_AS:$RUN_GROUP" "$d"
            echo "gave $d to $RUN_AS:$RUN_GROUP"
            CHANGED=$((CHANGED + 1))
        fi
    done
fi

printf '%s\n' "${INSTALLED[@]}" > "$STAGE/manifest"
# What an earlier version installed and this one does not (a page of a removed command) goes.
if [ -f "$MANIFEST" ]; then
    while IFS= read -r f; do
        if [ -n "$f" ] && ! grep -qxF -- "$f" "$STAGE/manifest"; then
            rm -f -- "$f" && echo "removed $f (no longer installed)"
            CHANGED=$((CHANGED + 1))
        fi
    done < "$MANIFEST"
fi
cmp -s "$STAGE/manifest" "$MANIFEST" 2>/dev/null || install -m 644 "$STAGE/manifest" "$MANIFEST"

if [ "$CHANGED" = 0 ]; then
    say "nixpush $("$NIXPUSH" --version | cut -d' ' -f2-) is installed; nothing changed"
else
    say "installed nixpush $("$NIXPUSH" --version | cut -d' ' -f2-) into $PREFIX"
fi
cat <<NEXT

Next steps:
  1. A signing key, if you have none:
       $NIXPUSH keygen cache.example.org-1 /etc/nix/cache-secret-key /etc/nix/cache-public-key
  2. Set \`to\` and \`secret-key-files\` in $ETC/nixpush.toml, and credentials for S3 (for example
     AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in /etc/nixpush/aws.env, mode 0600).
  3. Start the daemon (after an upgrade: systemctl daemon-reload && systemctl restart nixpush-daemon):
       systemctl daemon-reload && systemctl enable --now nixpush-daemon
  4. Add to nix.conf on this builder, then restart nix-daemon:
       post-build-hook = $BIN/nixpush-hook
NEXT
if [ -n "$PRIVATE" ]; then
    cat <<NEXT
     and give nix-daemon NIXPUSH_CONFIG=$ETC/nixpush.toml in its environment (the hook reads
     /etc/nixpush/nixpush.toml otherwise). The unit is in $UNIT_DIR: link it into
     /etc/systemd/system to use it.
NEXT
fi
cat <<NEXT
  5. On the machines that substitute from the cache:
       substituters = https://cache.nixos.org s3://BUCKET?region=REGION
       trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= <your public key>
NEXT
