#!/usr/bin/env bash
# A CI job end to end on this machine, as the README's GitHub Actions example runs it: a private
# nix-daemon whose post-build-hook is nixpush-hook, `nixpush daemon` started detached, a mark, the
# job's builds, then `nixpush wait --since MARK`, then the daemon stopped. The S3 server sits behind
# a relay adding DELAY_MS each way (a 20 ms round trip by default). Prints how long `wait` added
# after the last build finished, over ROUNDS jobs.
# Usage: bench/ci-job.sh [BUILDS] [SIZE_MB] [ROUNDS]
#   BUILDS small builds per job, plus one build of SIZE_MB of mixed content (0 for none).
source "$(dirname "$0")/../scripts/lib.sh"
BUILDS="${1:-50}"
SIZE_MB="${2:-20}"
ROUNDS="${3:-3}"
DELAY_MS="${DELAY_MS:-10}"
ensure_bed_deps
build_nixpush
say "building the relay (release)"
(cd "$REPO" && cargo build --release --locked --quiet -p nixpush-testbed --bin nixpush-relay)
WORK=$(mktemp -d /tmp/nixpush-cijob.XXXXXX)
trap 'bed_stop; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
export NIXPUSH_CONFIG="$WORK/nixpush.toml"
BED_EXTRA_CONF="post-build-hook = $NIXPUSH_HOOK" bed_start "$WORK"
"$REPO/target/release/nixpush-relay" "127.0.0.1:$S3_PORT" --delay-ms "$DELAY_MS" > "$WORK/relay" &
PIDS+=($!)
wait_for "the relay" test -s "$WORK/relay"
RELAY=$(head -1 "$WORK/relay")
"$NIXPUSH" keygen cijob-1 "$WORK/sk" "$WORK/pk" > /dev/null
cat > "$NIXPUSH_CONFIG" <<TOML
to = "s3://cache?endpoint=$RELAY&region=us-east-1&compression=zstd"
secret-key-files = ["$WORK/sk"]
state-dir = "$WORK/state"
socket = "$WORK/hook.sock"
spill-dir = "$WORK/spill"
gc-roots-dir = "$WORK/gcroots"
TOML

job() { # job ROUND: prints "last-build-to-wait-return-ms wait-ms published"
    setsid "$NIXPUSH" daemon > "$WORK/daemon.$1.log" 2>&1 < /dev/null &
    local daemon=$!
    local mark
    mark=$("$NIXPUSH" mark)
    cat > "$WORK/job.$1.nix" <<NIX
let
  nonce = "$1-$(date +%s%N)";
  small = builtins.genList (i: derivation {
    name = "cijob-\${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo \$name \$nonce > \$out" ];
    inherit nonce;
  }) $BUILDS;
  big = import $REPO/bench/bench.nix { inherit nonce; sizeMb = $SIZE_MB; };
in small ++ (if $SIZE_MB > 0 then [ big.big ] else [ ])
NIX
    nix-build --no-out-link "$WORK/job.$1.nix" > "$WORK/job.$1.out" 2> "$WORK/job.$1.err" \
        || { echo "the job's builds failed:" >&2; tail -5 "$WORK/job.$1.err" >&2; exit 1; }
    local built waited
    built=$(date +%s%N)
    "$NIXPUSH" wait --since "$mark" --timeout 600 --json > "$WORK/wait.$1.json" 2> "$WORK/wait.$1.err" \
        || { echo "nixpush wait failed:" >&2; cat "$WORK/wait.$1.err" >&2; exit 1; }
    waited=$(date +%s%N)
    kill "$daemon"; wait "$daemon" 2>/dev/null || true
    echo "$(( (waited - built) / 1000000 )) $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["published"]))' "$WORK/wait.$1.json")"
}

say "$ROUNDS jobs of $BUILDS small builds and one of $SIZE_MB MB, ${DELAY_MS} ms each way to S3"
added=()
for round in $(seq 1 "$ROUNDS"); do
    read -r ms published < <(job "$round")
    echo "job $round: wait returned $ms ms after the last build; $published items published"
    added+=("$ms")
done
python3 - "${added[*]}" <<'PY'
import statistics, sys
added = [int(x) for x in sys.argv[1].split()]
print(f"time nixpush wait added after the last build: median {statistics.median(added):.0f} ms "
      f"over {len(added)} jobs {added}")
PY
