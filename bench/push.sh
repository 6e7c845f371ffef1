#!/usr/bin/env bash
# Benchmark (not a test): nixpush push against `nix copy` (Nix 2.8) to the same s3s-fs, zstd, in one
# run. Nix 2.8 has no S3 support, so it writes through its HTTP store, which PUTs to the anonymous
# s3s-fs over the same data directory; nixpush goes through the SigV4 endpoint.
#   1. a 1 GB path of mixed content: wall time and peak RSS;
#   2. a cold 500-path closure: wall time.
# Each tool writes to a fresh bucket. Usage: bench/push.sh [SIZE_MB] [PATHS] [ROUNDS]
source "$(dirname "$0")/../scripts/lib.sh"
SIZE_MB="${1:-1000}"
PATHS="${2:-500}"
ROUNDS="${3:-5}"
ensure_bed_deps
ensure_apt time
build_nixpush
WORK=$(mktemp -d /tmp/nixpush-bench.XXXXXX)
trap 'bed_stop; rm -rf "$WORK"' EXIT
BED_EXTRA_CONF="max-jobs = 4"
bed_start "$WORK"
"$NIXPUSH" keygen bench-1 "$WORK/sk" "$WORK/pk" > /dev/null
NONCE="bench-$(date +%s%N)"
BENCH_NIX="$REPO/bench/bench.nix"

say "building the $SIZE_MB MB mixed path and the $PATHS-path closure"
BIG=$(nix-build --no-out-link "$BENCH_NIX" -A big --argstr nonce "$NONCE" --arg sizeMb "$SIZE_MB" --arg paths "$PATHS")
SMALL=$(nix-build --no-out-link "$BENCH_NIX" -A small --argstr nonce "$NONCE" --arg sizeMb "$SIZE_MB" --arg paths "$PATHS" 2>/dev/null)
echo "big:   $BIG ($(du -sh "$BIG" | cut -f1))"
echo "small: $(nix-store -qR "$SMALL" | wc -l) paths"

measure() { # measure LABEL COMMAND...: prints "seconds peak_rss_kib" for the command
    local label="$1" out="$WORK/time.$1"; shift
    /usr/bin/time -f "%e %M" -o "$out" "$@" > "$WORK/$label.log" 2>&1 \
        || { echo "FAILED: $*" >&2; tail -5 "$WORK/$label.log" >&2; exit 1; }
    cat "$out"
}
run() { # run TOOL BUCKET PATH: push PATH's closure into a fresh bucket with TOOL
    mkdir -p "$WORK/s3/$2"
    # The same warm page cache for both tools.
    find $(nix-store -qR "$3") -type f -exec cat {} + > /dev/null
    case "$1" in
        nixpush) measure "$2" "$NIXPUSH" push --secret-key-file "$WORK/sk" \
                    --to "s3://$2?endpoint=http://127.0.0.1:$S3_PORT&region=us-east-1&compression=zstd" "$3" ;;
        nix-copy) measure "$2" nix copy --to "http://127.0.0.1:$ANON_PORT/$2?compression=zstd&secret-key=$WORK/sk" "$3" ;;
    esac
}

say "$SIZE_MB MB path (zstd): nix copy, then nixpush"
read -r copy_s copy_kb < <(run nix-copy copy-big "$BIG")
read -r push_s push_kb < <(run nixpush push-big "$BIG")
# Seconds-long runs on a shared 2-core machine move by tens of percent: alternate the tools over
# several rounds, each into a fresh bucket, and compare medians.
say "$PATHS-path closure, cold cache (zstd): nix copy and nixpush alternately, $ROUNDS rounds"
copy_runs=(); push_runs=()
for round in $(seq 1 "$ROUNDS"); do
    read -r s _ < <(run nix-copy "copy-many-$round" "$SMALL"); copy_runs+=("$s")
    read -r s _ < <(run nixpush "push-many-$round" "$SMALL"); push_runs+=("$s")
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END{print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
copy_many_s=$(median "${copy_runs[@]}")
push_many_s=$(median "${push_runs[@]}")

for b in copy-big push-big copy-many-1 push-many-1; do
    echo "$b: $(ls "$WORK/s3/$b" | grep -c narinfo) narinfos, $(du -sh "$WORK/s3/$b" | cut -f1)"
done
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
echo
printf '%-28s %12s %12s %8s\n' "" "nix copy" "nixpush" "ratio"
printf '%-28s %11ss %11ss %8s\n' "$SIZE_MB MB path: wall time" "$copy_s" "$push_s" "$(ratio "$push_s" "$copy_s")"
printf '%-28s %9s MiB %9s MiB %8s\n' "$SIZE_MB MB path: peak RSS" "$((copy_kb / 1024))" "$((push_kb / 1024))" "$(ratio "$push_kb" "$copy_kb")"
printf '%-28s %11ss %11ss %8s\n' "$PATHS-path closure: wall" "$copy_many_s" "$push_many_s" "$(ratio "$push_many_s" "$copy_many_s")"
echo "($PATHS-path closure: medians of $ROUNDS rounds; nix copy ${copy_runs[*]} s, nixpush ${push_runs[*]} s)"
