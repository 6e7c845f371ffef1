#!/usr/bin/env bash
# Benchmark (not a test): threads, memory and CPU of compression, by nixpush push and by `nix copy`
# of Nix 2.8 into a directory cache, alternating over ROUNDS rounds for each of COMPRESSIONS.
#   1. PATHS paths of SIZE_MB of mixed content (a third each random, text and machine code) pushed
#      at once (jobs=16, parallel-compression on): per tool the median wall time, peak RSS
#      (/usr/bin/time) and peak thread count (sampled every 50 ms from /proc). PATHS=0 skips it.
#   2. a closure of 1,001 small paths (bench.nix's `layered`): per tool the median wall time, CPU
#      time (user and system) and peak RSS, where a compressor's set-up for each path shows.
# Usage: bench/compression.sh [ROUNDS] [PATHS] [SIZE_MB] [COMPRESSIONS]
source "$(dirname "$0")/../scripts/lib.sh"
ROUNDS="${1:-3}"
PATHS="${2:-16}"
SIZE_MB="${3:-64}"
COMPRESSIONS="${4:-zstd xz}"
ensure_bed_deps
build_nixpush
WORK=$(mktemp -d /var/tmp/nixpush-compression.XXXXXX)
trap 'bed_stop; rm -rf "$WORK"' EXIT
BED_EXTRA_CONF="max-jobs = 2"
bed_start "$WORK"
"$NIXPUSH" keygen bench-1 "$WORK/sk" "$WORK/pk" > /dev/null

median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END{print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
if [ "$PATHS" -gt 0 ]; then
    say "building $PATHS paths of $SIZE_MB MB"
    ROOT=$(nix-build --no-out-link "$REPO/bench/bench.nix" -A wide --argstr nonce "compression-$(date +%s%N)" \
        --arg paths "$PATHS" --arg sizeMb "$SIZE_MB" 2> "$WORK/build.log")
    echo "$(nix-store -qR "$ROOT" | wc -l) paths, $(du -scb $(nix-store -qR "$ROOT") | tail -n 1 | awk '{print int($1 / 1048576)}') MiB"

    # peak_threads PID: the most threads PID had at once, until it exits.
    peak_threads() {
        local max=0 n
        while n=$(awk '/^Threads:/ {print $2}' "/proc/$1/status" 2>/dev/null); do
            [ "$n" -gt "$max" ] && max=$n
            sleep 0.05
        done
        echo "$max"
    }

    run() { # run TOOL COMPRESSION DIR: prints "seconds peak_rss_mib peak_threads"
        local out="$WORK/$3" url
        rm -rf "$out"
        url="file://$out?compression=$2&parallel-compression=true"
        case "$1" in
            nixpush) /usr/bin/time -f "%e %M" -o "$WORK/time" "$NIXPUSH" push --jobs 16 \
                        --secret-key-file "$WORK/sk" --spool-dir "$WORK/spool" --to "$url" "$ROOT" \
                        > "$WORK/run.log" 2>&1 & ;;
            nix-copy) /usr/bin/time -f "%e %M" -o "$WORK/time" nix copy --to "$url&secret-key=$WORK/sk" "$ROOT" \
                        > "$WORK/run.log" 2>&1 & ;;
        esac
        local timer=$! pid="" threads=0
        # The tool is /usr/bin/time's child; sample it from the moment it appears.
        while [ -z "$pid" ] && kill -0 "$timer" 2> /dev/null; do
            pid=$(pgrep -P "$timer" || true)
        done
        [ -z "$pid" ] || threads=$(peak_threads "$pid")
        wait "$timer" || { echo "FAILED: $1 $2" >&2; tail -5 "$WORK/run.log" >&2; exit 1; }
        read -r secs rss_kb < "$WORK/time"
        echo "$secs $((rss_kb / 1024)) $threads"
    }

    echo
    for c in $COMPRESSIONS; do
        declare -A secs=() rss=() thr=()
        for round in $(seq 1 "$ROUNDS"); do
            for tool in nix-copy nixpush; do
                read -r s m t < <(run "$tool" "$c" "$tool-$c")
                secs[$tool]+="$s "; rss[$tool]+="$m "; thr[$tool]+="$t "
                echo "$c round $round: $tool $s s, peak RSS $m MiB, peak threads $t"
            done
        done
        for tool in nix-copy nixpush; do
            # shellcheck disable=SC2086
            printf '%-5s %-9s median of %s: %7s s   peak RSS %6s MiB   peak threads %4s\n' "$c" "$tool" "$ROUNDS" \
                "$(median ${secs[$tool]})" "$(median ${rss[$tool]})" "$(median ${thr[$tool]})"
        done
        unset secs rss thr
    done
    echo "($(nproc) cores; nixpush's compression budget is max(cores, 2) threads in all)"
fi

say "building a closure of small paths"
SMALL=$(nix-build --no-out-link "$REPO/bench/bench.nix" -A layered --argstr nonce "compression-$(date +%s%N)" \
    2> "$WORK/build.log")
echo "$(nix-store -qR "$SMALL" | wc -l) paths"
small() { # small TOOL COMPRESSION: prints "seconds cpu_seconds peak_rss_mib"
    local out="$WORK/small-$1-$2" url
    rm -rf "$out"
    url="file://$out?compression=$2"
    case "$1" in
        nixpush) /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$NIXPUSH" push \
                    --secret-key-file "$WORK/sk" --spool-dir "$WORK/spool" --to "$url" "$SMALL" \
                    > "$WORK/run.log" 2>&1 ;;
        nix-copy) /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" nix copy --to "$url&secret-key=$WORK/sk" \
                    "$SMALL" > "$WORK/run.log" 2>&1 ;;
    esac || { echo "FAILED: $1 $2" >&2; tail -5 "$WORK/run.log" >&2; exit 1; }
    read -r secs user sys rss_kb < "$WORK/time"
    echo "$secs $(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.2f", u + s}') $((rss_kb / 1024))"
}
echo
for c in $COMPRESSIONS; do
    declare -A secs=() cpu=() rss=()
    for round in $(seq 1 "$ROUNDS"); do
        for tool in nix-copy nixpush; do
            read -r s u m < <(small "$tool" "$c")
            secs[$tool]+="$s "; cpu[$tool]+="$u "; rss[$tool]+="$m "
            echo "small paths, $c round $round: $tool $s s, CPU $u s, peak RSS $m MiB"
        done
    done
    for tool in nix-copy nixpush; do
        # shellcheck disable=SC2086
        printf 'small paths, %-5s %-9s median of %s: %6s s   CPU %6s s   peak RSS %5s MiB\n' "$c" "$tool" \
            "$ROUNDS" "$(median ${secs[$tool]})" "$(median ${cpu[$tool]})" "$(median ${rss[$tool]})"
    done
    unset secs cpu rss
done
