#!/usr/bin/env bash
# Benchmark (not a test) of the post-build-hook path.
#   1. nixpush-hook latency, p50/p99 over N runs, with the daemon up and with it down;
#   2. 100 trivial builds through a private nix-daemon with post-build-hook set to /bin/true (the
#      floor), to nixpush-hook (daemon up), and to the documented recipe (`nix copy` in the hook).
# Usage: bench/hook.sh [RUNS] [BUILDS]
source "$(dirname "$0")/../scripts/lib.sh"
RUNS="${1:-1000}"
BUILDS="${2:-100}"
ensure_test_deps
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
TOML
export NIXPUSH_CONFIG="$WORK/nixpush.toml"

start_daemon() {
    ${DAEMON_NICE:+nice -n "$DAEMON_NICE"} "$NIXPUSH" daemon > "$WORK/daemon.log" 2>&1 &
    DAEMON=$!
    PIDS+=("$DAEMON")
    wait_for "nixpush daemon" test -S "$WORK/hook.sock"
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

say "$BUILDS trivial builds per hook"
read -r _ noop_ms noop_n _ < <(builds noop /bin/true)
# Daemon down: the hook commits to the queue itself and nothing uploads during the builds, which
# isolates what the hook costs the build loop from what concurrent uploads cost a 2-core machine.
read -r _ direct_ms direct_n _ < <(builds nixpush-direct "$HOOK")
start_daemon
read -r _ np_ms np_n np_lines < <(builds nixpush "$HOOK")
# Proof the hook did its job: every build's outputs end up in the bucket.
wait_for "the daemon to publish the builds" sh -c "[ \$(ls '$WORK/s3/cache' | grep -c 'narinfo\$') -ge $BUILDS ]"
stop_daemon
read -r _ recipe_ms recipe_n _ < <(builds recipe "$WORK/recipe-hook.sh")
echo "nixpush-hook printed $np_lines lines into the build log; bucket 'cache' has $(ls "$WORK/s3/cache" | grep -c 'narinfo$') narinfos"
echo "the recipe's nix copy put $(ls "$WORK/s3/recipe" | grep -c 'narinfo$') narinfos in bucket 'recipe'"
echo
printf '%-34s %8s %8s\n' "post-build-hook" "builds" "wall"
printf '%-34s %8s %6s ms\n' "/bin/true (floor)" "$noop_n" "$noop_ms"
printf '%-34s %8s %6s ms  (%s x floor)\n' "nixpush-hook (daemon down)" "$direct_n" "$direct_ms" "$(python3 -c "print(f'{$direct_ms/$noop_ms:.2f}')")"
printf '%-34s %8s %6s ms  (%s x floor)\n' "nixpush-hook (daemon up, uploading)" "$np_n" "$np_ms" "$(python3 -c "print(f'{$np_ms/$noop_ms:.2f}')")"
printf '%-34s %8s %6s ms  (%s x floor)\n' "recipe: nix copy in the hook" "$recipe_n" "$recipe_ms" "$(python3 -c "print(f'{$recipe_ms/$noop_ms:.2f}')")"
cat "$WORK/lat-down" "$WORK/lat-up"
