#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian machine (as root): a private nix-daemon whose
# post-build-hook is nixpush-hook, `nixpush daemon` uploading to an S3 server (SigV4 checked), a
# build, the daemon publishing it, `nixpush verify` auditing the bucket, the closure deleted from the
# store and substituted back by stock Nix trusting only our key.
source "$(dirname "$0")/lib.sh"
ensure_bed_deps
build_nixpush
WORK=$(mktemp -d /tmp/nixpush-demo.XXXXXX)
trap 'bed_stop; rm -rf "$WORK"' EXIT
NONCE="demo-$(date +%s%N)"

say "scripts/install.sh --prefix $WORK/prefix (a private prefix, so the demo leaves the machine as it was)"
"$REPO/scripts/install.sh" --prefix "$WORK/prefix" --from "$REPO/target/release" | sed 's/^/  /'
NIXPUSH="$WORK/prefix/bin/nixpush"
NIXPUSH_HOOK="$WORK/prefix/bin/nixpush-hook"

say "nixpush keygen demo-cache-1"
"$NIXPUSH" keygen demo-cache-1 "$WORK/secret.key" "$WORK/public.key"

say "starting an S3 server (s3s-fs, SigV4 checked) and a private nix-daemon with post-build-hook = nixpush-hook"
# The hook runs inside nix-daemon and finds the installed configuration through the daemon's
# environment (a system install uses /etc/nixpush/nixpush.toml, where nothing needs saying).
export NIXPUSH_CONFIG="$WORK/prefix/etc/nixpush/nixpush.toml"
BED_EXTRA_CONF="post-build-hook = $NIXPUSH_HOOK"
bed_start "$WORK"
cat >> "$NIXPUSH_CONFIG" <<TOML
to = "$S3_URL&compression=zstd"
secret-key-files = ["$WORK/secret.key"]
socket = "$WORK/hook.sock"
TOML
echo "nix.conf:"; sed 's/^/  /' "$WORK/conf/nix.conf"
echo "$NIXPUSH_CONFIG, without its comments:"; grep -v '^#' "$NIXPUSH_CONFIG" | grep . | sed 's/^/  /'

say "starting nixpush daemon"
"$NIXPUSH" daemon > "$WORK/daemon.log" 2>&1 &
DAEMON=$!
PIDS+=("$DAEMON")
wait_for "nixpush daemon" test -S "$WORK/hook.sock"

say "building a small closure (a library, a tool that uses it); watch the post-build-hook lines"
cat > "$WORK/demo.nix" <<'NIX'
{ nonce }:
let
  sh = name: script: derivation {
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  };
  lib = sh "demo-lib" ''mkdir -p $out/lib && echo "hello from nixpush" > $out/lib/greeting'';
in sh "demo-tool" ''
  mkdir -p $out/bin
  printf '#!/bin/sh\ncat ${lib}/lib/greeting\n' > $out/bin/greet
  chmod +x $out/bin/greet
''
NIX
OUT=$(nix-build --no-out-link "$WORK/demo.nix" --argstr nonce "$NONCE")
CLOSURE=$(nix-store --query --requisites "$OUT")
echo "$OUT"; "$OUT/bin/greet"

say "waiting for the daemon to publish (nixpush status)"
published() { for p in $CLOSURE; do [ -f "$WORK/s3/cache/$(basename "$p" | cut -c1-32).narinfo" ] || return 1; done; }
wait_for "the closure to be published" published
"$NIXPUSH" status
echo "daemon log:"; grep -E "uploaded|pushing" "$WORK/daemon.log" | sed 's/^/  /'
echo "bucket now holds:"; (cd "$WORK/s3/cache" && find . -type f | sort | sed 's/^/  /')

say "nixpush push of the same closure: nothing left to upload"
"$NIXPUSH" push --to "$S3_URL" --secret-key-file "$WORK/secret.key" "$OUT"

say "nixpush verify: signatures, NAR hashes and closure completeness of the whole bucket"
"$NIXPUSH" verify --store "$S3_URL" --trusted-public-key "$WORK/public.key" --all

say "deleting the closure from the store"
nix-store --delete $CLOSURE
for p in $CLOSURE; do nix-store --check-validity "$p" 2>/dev/null && { echo "$p still valid" >&2; exit 1; }; done
echo "gone: $(echo $CLOSURE | wc -w) paths"

say "substituting it back from $HTTP_URL, trusting only $(cut -d: -f1 "$WORK/public.key")"
nix-store --realise "$OUT" --option substituters "$HTTP_URL" \
    --option trusted-public-keys "$(cat "$WORK/public.key")"
"$OUT/bin/greet"

say "stopping the daemon (SIGTERM)"
kill -TERM "$DAEMON"; wait "$DAEMON"
say "done: built, queued by the hook, published by the daemon, deleted, substituted back and verified by Nix"
