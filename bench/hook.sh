#!/usr/bin/env bash
# Benchmark (not a test) of the post-build-hook path.
#   1. nixpush-hook latency, p50/p99 over N runs, with the daemon up and with it down;
#   2. 100 trivial builds through a private nix-daemon with post-build-hook set to /bin/true (the
#      floor), to nixpush-hook (daemon down; daemon up, uploading to the S3 server; daemon up,
#      uploading to a directory cache), and to the documented recipe (`nix copy` in the hook). The
#      S3 server shares the builds' two cores here, as a remote one would not: the directory cache
#      tells what the daemon's own work costs the builds;
#   3. the publish lag (hook to narinfo acknowledged, as the queue records it), p50/p99, of a burst
#      of BURST hook calls for built paths, 16 at a time, with the daemon up.
# Usage: bench/hook.sh [RUNS] [BUILDS] [ROUNDS] [BURST]
source "$(dirname "$0")/../scripts/lib.sh"
RUNS="${1:-1000}"
BUILDS="${2:-100}"
ROUNDS="${3:-3}"
BURST="${4:-1000}"
ensure_bed_deps
build_nixpush
HOOK="$NIXPUSH_HOOK"
WORK=$(mktemp -d /tmp/nixpush-hookbench.XXXXXX)
trap 'bed_stop; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
bed_start "$WORK"
"$NIXPUSH" keygen hookbench-1 "$WORK/sk" "$WORK/pk" > /dev/null
cat > "$WORK/nixpush.toml" <<TOML
to = "$S3_URL"
secret-key-files = ["$WORK/sk"]
state-dir = "$WORK/state"
socket = "$WORK/hook.sock"
# Where Nix would not look, but on the same filesystem: the hook pays what rooting costs.
gc-roots-dir = "$WORK/gcroots"
TOML
export NIXPUSH_CONFIG="$WORK/nixpush.toml"
# The same daemon uploading to a directory on the same disk: no server's work on these cores.
mkdir -p "$WORK/dircache"
sed -e "s#^to = .*#to = \"file://$WORK/dircache?compression=zstd\"#" \
    -e "s#^state-dir = .*#state-dir = \"$WORK/state-dir\"#" \
    -e "s#^socket = .*#socket = \"$WORK/hook-dir.sock\"#" "$WORK/nixpush.toml" > "$WORK/nixpush-dir.toml"

start_daemon() {
    echo "== nixpush daemon with $NIXPUSH_CONFIG" >> "$WORK/daemon.log"
    ${DAEMON_NICE:+nice -n "$DAEMON_NICE"} "$NIXPUSH" daemon >> "$WORK/daemon.log" 2>&1 &
    DAEMON=$!
    PIDS+=("$DAEMON")
    wait_for "nixpush daemon" test -S "$(sed -n 's/^socket = "\(.*\)"$/\1/p' "$NIXPUSH_CONFIG")"
}
stop_daemon() { kill "$DAEMON"; wait "$DAEMON" 2>/dev/null || true; }

latency() { # latency LABEL: runs the hook RUNS times with a fresh OUT_PATHS each, prints p50/p99
    python3 - "$HOOK" "$RUNS" "$1" <<'PY'
import os, sys, time
hook, runs, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# posix_spawn (vfork) keeps the harness's own cost small; /bin/true measured the same way is the floor.
def run(argv, env):
    t = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    return (time.perf_counter_ns() - t) / 1e6
def pct(times):
    times.sort()
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return f"p50 {p(0.50):.2f} ms, p99 {p(0.99):.2f} ms, max {times[-1]:.2f} ms"
floor = [run(["/bin/true"], dict(os.environ)) for _ in range(runs)]
times = [run([hook], dict(os.environ, OUT_PATHS=f"/nix/store/{i % 10:0>32}-latency-{label}-{i}")) for i in range(runs)]
print(f"{label}: nixpush-hook {pct(times)} over {runs} runs (/bin/true spawned the same way: {pct(floor)})")
PY
}

say "hook latency ($RUNS runs each; includes process start)"
latency "daemon-down" | tee "$WORK/lat-down"
start_daemon
latency "daemon-up" | tee "$WORK/lat-up"
stop_daemon

# 100 trivial builds with a given post-build-hook, through a fresh private nix-daemon.
builds() { # builds LABEL HOOK
    local dir="$WORK/builds-$1"
    mkdir -p "$dir/conf"
    cat > "$dir/conf/nix.conf" <<CONF
build-users-group =
sandbox = false
substituters =
experimental-features = nix-command
post-build-hook = $2
CONF
    # Without NIX_REMOTE: a nix-daemon started with it forwards to that store (and its settings).
    env -u NIX_REMOTE NIX_CONF_DIR="$dir/conf" NIX_DAEMON_SOCKET_PATH="$dir/sock" nix-daemon > "$dir/daemon.log" 2>&1 &
    local nd=$!
    PIDS+=("$nd")
    wait_for nix-daemon test -S "$dir/sock"
    cat > "$dir/many.nix" <<NIX
builtins.genList (i: derivation {
  name = "hookbench-$1-\${toString i}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo \$name > \$out" ];
  nonce = "$(date +%s%N)";
}) $BUILDS
NIX
    local t0 t1
    t0=$(date +%s%N)
    NIX_CONF_DIR="$dir/conf" nix-build --store "unix://$dir/sock" --no-out-link "$dir/many.nix" > "$dir/out" 2> "$dir/err" \
        || { echo "builds with $1 failed:"; tail -3 "$dir/err"; }
    t1=$(date +%s%N)
    kill "$nd"; wait "$nd" 2>/dev/null || true
    echo "$1 $(( (t1 - t0) / 1000000 )) $(wc -l < "$dir/out") $(grep -c '^post-build-hook: nixpush-hook: queued' "$dir/err" || true)"
}

# The documented recipe, made to work on Nix 2.8 (whose OUT_PATHS is empty): outputs from DRV_PATH,
# uploaded by Nix 2.8 through its HTTP store (it has no S3 support) to the same s3s-fs.
mkdir -p "$WORK/s3/recipe"
cat > "$WORK/recipe-hook.sh" <<SH
#!/bin/sh
set -eu
set -f
export IFS=' '
OUT="\${OUT_PATHS:-\$(nix-store --query --outputs "\$DRV_PATH")}"
exec nix copy --to "http://127.0.0.1:$ANON_PORT/recipe?compression=zstd&secret-key=$WORK/sk" \$OUT
SH
chmod +x "$WORK/recipe-hook.sh"

narinfos() { ls "${1:-$WORK/s3/cache}" | grep -c 'narinfo$' || true; }
published_at_least() { [ "$(narinfos "${2:-}")" -ge "$1" ]; }

# Rounds alternate the hooks, so that a slow moment of the shared machine does not land on one of
# them alone; the medians are compared.
say "$BUILDS trivial builds per hook, $ROUNDS rounds"
noop=(); direct=(); up=(); updir=(); expected=0; lines=0; dir_expected=0
for round in $(seq 1 "$ROUNDS"); do
    read -r _ ms _ _ < <(builds "noop-$round" /bin/true); noop+=("$ms")
    # Daemon down: the hook commits to the queue itself and nothing uploads during the builds,
    # which isolates what the hook costs the build loop from what concurrent uploads cost.
    read -r _ ms _ _ < <(builds "down-$round" "$HOOK"); direct+=("$ms")
    # Those builds are uploaded before the next measurement, so that it sees only its own uploads.
    start_daemon
    expected=$((expected + BUILDS))
    wait_for "the daemon to publish the builds made while it was down" published_at_least "$expected"
    read -r _ ms _ n < <(builds "up-$round" "$HOOK"); up+=("$ms"); lines=$((lines + n))
    # Proof the hook did its job: every build's outputs end up in the bucket.
    expected=$((expected + BUILDS))
    wait_for "the daemon to publish the builds" published_at_least "$expected"
    stop_daemon
    export NIXPUSH_CONFIG="$WORK/nixpush-dir.toml"
    start_daemon
    read -r _ ms _ _ < <(builds "updir-$round" "$HOOK"); updir+=("$ms")
    dir_expected=$((dir_expected + BUILDS))
    wait_for "the daemon to publish the builds to the directory" published_at_least "$dir_expected" "$WORK/dircache"
    stop_daemon
    export NIXPUSH_CONFIG="$WORK/nixpush.toml"
done
read -r _ recipe_ms _ _ < <(builds recipe "$WORK/recipe-hook.sh")
echo "nixpush-hook printed $lines 'queued' lines into the build logs with the daemon up; bucket 'cache' has $(narinfos) narinfos"
echo "the daemon uploading to a directory put $(narinfos "$WORK/dircache") narinfos in it"
echo "the recipe's nix copy put $(ls "$WORK/s3/recipe" | grep -c 'narinfo$') narinfos in bucket 'recipe'"
echo
python3 - "$BUILDS" "${noop[*]}" "${direct[*]}" "${up[*]}" "${updir[*]}" "$recipe_ms" <<'PY'
import statistics, sys
builds = sys.argv[1]
noop, direct, up, updir = ([int(x) for x in a.split()] for a in sys.argv[2:6])
recipe = int(sys.argv[6])
floor = statistics.median(noop)
print(f"{builds} builds per run; median wall time over {len(noop)} rounds (all rounds in brackets)")
def row(label, runs):
    m = statistics.median(runs)
    print(f"{label:<40} {m:7.0f} ms  {m / floor:5.2f} x floor   {runs}")
row("/bin/true (floor)", noop)
row("nixpush-hook (daemon down)", direct)
row("nixpush-hook (daemon up, uploading)", up)
row("  the same, uploading to a directory", updir)
row("recipe: nix copy in the hook (1 run)", [recipe])
PY
cat "$WORK/lat-down" "$WORK/lat-up"

say "publish lag of a burst of $BURST hook calls"
BUILDS="$BURST" builds burst /bin/true > /dev/null
start_daemon
python3 - "$HOOK" "$WORK/builds-burst/out" <<'PY'
import os, sys
hook, outs = sys.argv[1], open(sys.argv[2]).read().split()
running = []
for p in outs:
    if len(running) == 16:
        _, status = os.waitpid(running.pop(0), 0)
        assert status == 0, status
    running.append(os.posix_spawn(hook, [hook], dict(os.environ, OUT_PATHS=p),
        file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]))
for pid in running:
    assert os.waitpid(pid, 0)[1] == 0
PY
cat > "$WORK/burst.py" <<'PY'
# burst.py QUEUE OUTS done|lag: whether every path of the burst is recorded done (just after its
# narinfo was acknowledged), or the publish lags the queue recorded for them.
import sqlite3, sys
db, outs = sqlite3.connect(sys.argv[1]), open(sys.argv[2]).read().split()
marks = ",".join("?" * len(outs))
lags = sorted(r[0] for r in db.execute(
    f"SELECT updated_at - enqueued_at FROM items WHERE state = 'done' AND item IN ({marks})", outs))
if sys.argv[3] == "done":
    sys.exit(0 if len(lags) == len(outs) else 1)
p = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]
print(f"burst of {len(lags)} hook calls (16 at a time): publish lag p50 {p(0.5) / 1000:.2f} s, "
      f"p99 {p(0.99) / 1000:.2f} s, max {lags[-1] / 1000:.2f} s")
PY
burst() { python3 "$WORK/burst.py" "$WORK/state/queue.sqlite" "$WORK/builds-burst/out" "$1"; }
for _ in $(seq 1 600); do burst done 2>/dev/null && break; sleep 0.5; done
burst done || { echo "the burst was not published within 5 minutes" >&2; exit 1; }
stop_daemon
burst lag
