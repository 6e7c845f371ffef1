#!/usr/bin/env bash
# Benchmark (not a test): a cold closure shaped like a real one (DEPTH levels of WIDTH small paths,
# each referencing two of the level below, and a root on top), pushed through relays that add
# DELAY_MS each way (a round trip of 2 x DELAY_MS), by nixpush push (SigV4 endpoint) and by
# `nix copy` of Nix 2.8 (HTTP PUTs to the anonymous s3s-fs over the same data). The tools alternate
# over ROUNDS rounds, each into a fresh bucket; medians are compared. nixpush also pushes through a
# relay that adds nothing: what the push costs on this machine with no latency at all (client, server,
# relay and nix-daemon share its cores), so that what the latency adds can be told from the rest.
# Each nixpush round also prints when its objects landed (the bucket's file times): the NARs, and the
# narinfos level by level, whose chain of acknowledged PUTs the push cannot shorten.
# Usage: bench/latency.sh [DELAY_MS] [ROUNDS] [DEPTH] [WIDTH]
source "$(dirname "$0")/../scripts/lib.sh"
DELAY_MS="${1:-10}"
ROUNDS="${2:-3}"
DEPTH="${3:-20}"
WIDTH="${4:-50}"
ensure_bed_deps
build_nixpush
say "building the relay (release)"
(cd "$REPO" && cargo build --release --locked --quiet -p nixpush-testbed --bin nixpush-relay)
WORK=$(mktemp -d /tmp/nixpush-latency.XXXXXX)
trap 'bed_stop; rm -rf "$WORK"' EXIT
BED_EXTRA_CONF="max-jobs = 4"
bed_start "$WORK"
"$NIXPUSH" keygen bench-1 "$WORK/sk" "$WORK/pk" > /dev/null

relay() { # relay NAME UPSTREAM_PORT [DELAY_MS]: starts a relay (stopped by bed_stop), sets RELAY to its endpoint
    local out="$WORK/relay.$1"
    shift
    "$REPO/target/release/nixpush-relay" "127.0.0.1:$1" --delay-ms "${2:-$DELAY_MS}" > "$out" &
    PIDS+=($!)
    wait_for "the relay" test -s "$out"
    RELAY=$(head -n 1 "$out")
}
relay s3 "$S3_PORT"; S3_RELAY="$RELAY"
relay http "$ANON_PORT"; HTTP_RELAY="$RELAY"
relay near "$S3_PORT" 0; NEAR_RELAY="$RELAY"

say "building the closure ($DEPTH levels of $WIDTH paths and a root)"
ROOT=$(nix-build --no-out-link "$REPO/bench/bench.nix" -A layered --argstr nonce "latency-$(date +%s%N)" \
    --arg depth "$DEPTH" --arg width "$WIDTH" 2> "$WORK/build.log")
COUNT=$(nix-store -qR "$ROOT" | wc -l)
echo "$COUNT paths"

run() { # run TOOL BUCKET: seconds to push the closure into a fresh bucket
    mkdir -p "$WORK/s3/$2"
    local start end
    # What the previous run left to write back (nix copy's 1,001 objects and its disk cache) is
    # written before this one starts, not during it.
    sync
    start=$(date +%s.%N)
    case "$1" in
        nixpush|nixpush-near)
            local endpoint="$S3_RELAY"
            [ "$1" = nixpush ] || endpoint="$NEAR_RELAY"
            "$NIXPUSH" push --secret-key-file "$WORK/sk" \
                    --to "s3://$2?endpoint=$endpoint&region=us-east-1&compression=zstd" "$ROOT" \
                    > "$WORK/$2.log" 2>&1 ;;
        nix-copy) nix copy --to "$HTTP_RELAY/$2?compression=zstd&secret-key=$WORK/sk" "$ROOT" \
                    > "$WORK/$2.log" 2>&1 ;;
    esac || { echo "FAILED: $1" >&2; tail -5 "$WORK/$2.log" >&2; exit 1; }
    end=$(date +%s.%N)
    [ "$(ls "$WORK/s3/$2" | grep -c '\.narinfo$')" = "$COUNT" ] \
        || { echo "$1 published $(ls "$WORK/s3/$2" | grep -c '\.narinfo$') of $COUNT narinfos" >&2; exit 1; }
    [ "$1" = nix-copy ] || chain "$WORK/s3/$2" "$start" > "$WORK/$2.chain"
    python3 -c "print(f'{$end - $start:.2f}')"
}

chain() { # chain BUCKET_DIR START: when the objects landed (their files' times), by level
    python3 - "$@" <<'PY'
import os, re, sys
bucket, start = sys.argv[1], float(sys.argv[2])
nars, narinfos = [], {}
for name in os.listdir(bucket):
    if not name.endswith(".narinfo"):
        continue
    path = os.path.join(bucket, name)
    text = open(path).read()
    level = re.search(r"StorePath: /nix/store/\w+-bench-layer(?:-(\d+)-|ed-root)", text).group(1)
    level = int(level) if level is not None else None
    nars.append(os.stat(os.path.join(bucket, re.search(r"URL: (\S+)", text).group(1))).st_mtime - start)
    narinfos.setdefault(level, []).append(os.stat(path).st_mtime - start)
first = max(narinfos[0])
last = narinfos[None][0]
levels = len(narinfos) - 1
print(f"NARs landed {min(nars):.2f}-{max(nars):.2f} s; the narinfos of level 0 by {first:.2f} s, "
      f"the root's at {last:.2f} s: {(last - first) / levels * 1000:.0f} ms a level")
PY
}

say "$ROUNDS rounds, $DELAY_MS ms each way: nix copy, nixpush, and nixpush with no delay, alternately"
copy_runs=(); push_runs=(); near_runs=()
for round in $(seq 1 "$ROUNDS"); do
    copy_runs+=("$(run nix-copy "copy-$round")")
    push_runs+=("$(run nixpush "push-$round")")
    near_runs+=("$(run nixpush-near "near-$round")")
    echo "round $round: nix copy ${copy_runs[-1]} s, nixpush ${push_runs[-1]} s, nixpush with no delay ${near_runs[-1]} s"
    echo "  nixpush: $(cat "$WORK/push-$round.chain")"
    echo "  nixpush with no delay: $(cat "$WORK/near-$round.chain")"
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END{print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
copy_s=$(median "${copy_runs[@]}")
push_s=$(median "${push_runs[@]}")
near_s=$(median "${near_runs[@]}")
# The publish order allows a narinfo only after its references' narinfos: one acknowledged PUT per
# level and the root, after a few round trips to start (HeadBucket, nix-cache-info, the probes).
floor=$(python3 -c "print(f'{($DEPTH + 1 + 3) * 2 * $DELAY_MS / 1000:.2f}')")
echo
echo "$COUNT paths, depth $((DEPTH + 1)), round trip $((2 * DELAY_MS)) ms; medians of $ROUNDS rounds"
printf '%-26s %8ss\n' "nix copy" "$copy_s"
printf '%-26s %8ss   (%s x nix copy)\n' "nixpush push" "$push_s" "$(python3 -c "print(f'{$push_s/$copy_s:.3f}')")"
ratio() { python3 -c "print(f'{($1)/($2):.2f}' if ($2) > 0 else '-')"; }
printf '%-26s %8ss   (nixpush is %s x the floor)\n' "latency floor" "$floor" "$(ratio "$push_s" "$floor")"
# Negative when the delayed runs happened to be the faster ones: the latency then cost nothing measurable.
printf '%-26s %8ss   (the latency added %ss: %s x the floor)\n' "nixpush, no delay" "$near_s" \
    "$(python3 -c "print(f'{$push_s - $near_s:.2f}')")" "$(ratio "$push_s - $near_s" "$floor")"
