#!/usr/bin/env bash
# Benchmark (not a test): `nixpush gc` of a synthetic cache of NARINFOS narinfos (each with a small
# NAR) on s3s-fs. The objects are written straight into s3s-fs's directory, two days old: chains of
# paths, every tenth chain pinned, the rest dead. A first run collects with an empty memo; then
# NEW fresh narinfos are added and a second run reads only those. Prints, for each run, the wall
# time, the S3 requests by operation, and the peak RSS.
# Usage: bench/gc.sh [NARINFOS] [NEW]
source "$(dirname "$0")/../scripts/lib.sh"
NARINFOS="${1:-100000}"
NEW="${2:-1000}"
ensure_bed_deps
build_nixpush
WORK=$(mktemp -d /tmp/nixpush-gcbench.XXXXXX)
trap 'bed_stop; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
bed_start "$WORK"
BUCKET="$WORK/s3/cache"

# generate DIR COUNT AGE_SECONDS PIN: COUNT narinfos in chains of 10 (each references the one
# before), NARs of 64 random bytes; with PIN, every tenth chain's head goes into a pin.
generate() {
    python3 - "$@" <<'PY'
import hashlib, json, os, random, sys, time
bucket, count, age, pin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "pin"
A = "0123456789abcdfghijklmnpqrsvwxyz"
def nix32(n):
    return "".join(random.choice(A) for _ in range(n))
def sha256():
    # 52 digits hold 260 bits: the first may only be 0 or 1.
    return random.choice("01") + nix32(51)
os.makedirs(os.path.join(bucket, "nar"), exist_ok=True)
when = time.time() - age
pinned, prev = [], None
for i in range(count):
    h = nix32(32)
    path = f"/nix/store/{h}-bench-{i}"
    nar = os.urandom(64)
    file_hash = sha256()
    url = f"nar/{file_hash}.nar"
    refs = [prev] if prev and i % 10 else []
    with open(os.path.join(bucket, url), "wb") as f:
        f.write(nar)
    text = (f"StorePath: {path}\nURL: {url}\nCompression: none\nFileHash: sha256:{file_hash}\n"
            f"FileSize: 64\nNarHash: sha256:{sha256()}\nNarSize: 64\n"
            f"References: {' '.join(r.split('/')[-1] for r in refs)}\n")
    key = os.path.join(bucket, f"{h}.narinfo")
    with open(key, "w") as f:
        f.write(text)
    for p in (key, os.path.join(bucket, url)):
        os.utime(p, (when, when))
    if i % 10 == 9 and (i // 10) % 10 == 0:
        pinned.append(path)
    prev = path
if pin:
    os.makedirs(os.path.join(bucket, "nixpush", "pins"), exist_ok=True)
    with open(os.path.join(bucket, "nixpush", "pins", "bench.json"), "w") as f:
        json.dump({"paths": pinned, "created": int(time.time())}, f)
PY
}

say "writing $NARINFOS narinfos and their NARs into s3s-fs's directory"
start=$(date +%s)
generate "$BUCKET" "$NARINFOS" $((2 * 86400)) pin
echo "written in $(( $(date +%s) - start )) s"

run() { # run NAME: one collection, its figures on a line
    /usr/bin/time -f "%e %M" -o "$WORK/time.$1" "$NIXPUSH" gc --store "$S3_URL" \
        --keep-within 1h --nar-grace 0s --memo "$WORK/memo.json" --json \
        > "$WORK/gc.$1.json" 2> "$WORK/gc.$1.err" \
        || { echo "gc failed:" >&2; cat "$WORK/gc.$1.err" >&2; exit 1; }
    python3 - "$1" "$WORK/gc.$1.json" "$WORK/time.$1" <<'PY'
import json, sys
name, report, timing = sys.argv[1], json.load(open(sys.argv[2])), open(sys.argv[3]).read().split()
requests = ", ".join(f"{k} {v}" for k, v in sorted(report["requests"].items()))
print(f"{name}: {float(timing[0]):.1f} s wall, peak RSS {int(timing[1]) // 1024} MiB; "
      f"{report['narinfos']} narinfos, {report['narinfos_read']} read, {report['live']} live, "
      f"{report['deleted_narinfos']} narinfos and {report['deleted_nars']} NARs deleted; "
      f"requests: {requests}")
PY
}

say "first run (empty memo)"
run first
say "adding $NEW fresh narinfos"
generate "$BUCKET" "$NEW" 0 no
say "second run (memo from the first)"
run second
