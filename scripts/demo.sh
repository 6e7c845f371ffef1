#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian machine (as root): make a signing key, build a small
# closure with a private nix-daemon, push it to an S3 server (SigV4), delete it from the store, and
# substitute it back with stock Nix trusting only our key.
source "$(dirname "$0")/lib.sh"
ensure_test_deps
build_nixpush
WORK=$(mktemp -d /tmp/nixpush-demo.XXXXXX)
trap 'bed_stop; rm -rf "$WORK"' EXIT
NONCE="demo-$(date +%s%N)"

say "starting a private nix-daemon and an S3 server (s3s-fs, SigV4 checked)"
bed_start "$WORK"
echo "S3 endpoint: http://127.0.0.1:$S3_PORT (bucket 'cache'); anonymous HTTP view: $HTTP_URL"

say "nixpush keygen demo-cache-1"
"$NIXPUSH" keygen demo-cache-1 "$WORK/secret.key" "$WORK/public.key"

say "building a small closure (a library, a tool that uses it)"
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

say "nixpush push --to '$S3_URL&compression=zstd' $OUT"
"$NIXPUSH" push --to "$S3_URL&compression=zstd" --secret-key-file "$WORK/secret.key" "$OUT"
echo "bucket now holds:"; (cd "$WORK/s3/cache" && find . -type f | sort | sed 's/^/  /')

say "deleting the closure from the store"
nix-store --delete $CLOSURE
for p in $CLOSURE; do nix-store --check-validity "$p" 2>/dev/null && { echo "$p still valid" >&2; exit 1; }; done
echo "gone: $(echo $CLOSURE | wc -w) paths"

say "substituting it back from $HTTP_URL, trusting only $(cut -d: -f1 "$WORK/public.key")"
nix-store --realise "$OUT" --option substituters "$HTTP_URL" \
    --option trusted-public-keys "$(cat "$WORK/public.key")"
"$OUT/bin/greet"
say "done: built, pushed, deleted, substituted back, verified by Nix against our key"
