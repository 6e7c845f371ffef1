#!/usr/bin/env bash
# Benchmark (not a test): nixpush verify on a cache holding one large NAR (default 1 GB of mixed
# content, zstd and xz), through SigV4 S3, anonymous HTTP and a directory: wall time and peak RSS,
# beside Nix 2.8's own `nix store verify` of the same path over HTTP (which also downloads and
# hashes the NAR). Goal: peak RSS under 200 MiB whatever the NAR's size.
# Usage: bench/verify.sh [SIZE_MB]
source "$(dirname "$0")/../scripts/lib.sh"
SIZE_MB="${1:-1000}"
ensure_bed_deps
ensure_apt time
build_nixpush
WORK=$(mktemp -d /tmp/nixpush-bench.XXXXXX)
trap 'bed_stop; rm -rf "$WORK"' EXIT
bed_start "$WORK"
"$NIXPUSH" keygen bench-1 "$WORK/sk" "$WORK/pk" > /dev/null
PK=$(cat "$WORK/pk")

say "building the $SIZE_MB MB mixed path"
BIG=$(nix-build --no-out-link "$REPO/bench/bench.nix" -A big --argstr nonce "verify-$(date +%s%N)" \
    --arg sizeMb "$SIZE_MB" --arg paths 1)
echo "big: $BIG ($(du -sh "$BIG" | cut -f1))"

measure() { # measure LABEL COMMAND...: prints "seconds peak_rss_kib"
    local label="$1"; shift
    /usr/bin/time -f "%e %M" -o "$WORK/time.$label" "$@" > "$WORK/$label.log" 2>&1 \
        || { echo "FAILED: $*" >&2; tail -5 "$WORK/$label.log" >&2; exit 1; }
    cat "$WORK/time.$label"
}

results=()
for c in zstd xz; do
    say "pushing it with compression=$c"
    b="bench-$c" # S3 bucket names have at least 3 characters
    mkdir -p "$WORK/s3/$b"
    "$NIXPUSH" push --secret-key-file "$WORK/sk" --to "s3://$b?endpoint=http://127.0.0.1:$S3_PORT&region=us-east-1&compression=$c" "$BIG" 2>&1 | tail -1
    for via in s3 http file; do
        case $via in
            s3) store="s3://$b?endpoint=http://127.0.0.1:$S3_PORT&region=us-east-1" ;;
            http) store="http://127.0.0.1:$ANON_PORT/$b" ;;
            file) store="file://$WORK/s3/$b" ;;
        esac
        say "nixpush verify, $c, via $via"
        read -r s kb < <(measure "verify-$c-$via" "$NIXPUSH" verify --store "$store" --trusted-public-key "$PK" "$BIG")
        results+=("$(printf '%-36s %8ss %8s MiB' "nixpush verify ($c, $via)" "$s" "$((kb / 1024))")")
    done
    say "nix store verify (Nix 2.8), $c, via http"
    read -r s kb < <(measure "nix-verify-$c" nix store verify --store "http://127.0.0.1:$ANON_PORT/$b" \
        --sigs-needed 1 --option trusted-public-keys "$PK" "$BIG")
    results+=("$(printf '%-36s %8ss %8s MiB' "nix store verify ($c, http)" "$s" "$((kb / 1024))")")
done
echo
printf '%-36s %9s %12s\n' "$SIZE_MB MB NAR" "wall" "peak RSS"
printf '%s\n' "${results[@]}"
