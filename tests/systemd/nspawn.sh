#!/usr/bin/env bash
# emberd's real unit files under a real systemd: boots this machine's own OS tree as a
# throwaway systemd-nspawn container (systemd as PID 1), installs systemd/emberd.socket and
# systemd/emberd.service from the repository unchanged plus a small test drop-in, enables the
# socket only, and runs tests/systemd/check.sh inside as a unit: socket activation, READY and
# its timing, the hardening in force, journald's structured fields, drain on stop, and the
# watchdog restarting a hung engine. The check writes PASS/FAIL lines into a bound results
# folder (the container console is not relied on), then powers the container off.
#
# Usage (as root; needs systemd-nspawn from Debian's systemd-container):
#   bash tests/systemd/nspawn.sh target/release/emberd
# Results (and logs) are left in target/systemd-nspawn/ for inspection. Exit status: 0 all
# checks passed, 1 a check failed, 3 no container could be booted on this machine.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TIMEOUT_S="${EMBERD_NSPAWN_TIMEOUT_S:-300}" # the whole boot, check and shutdown
OUT="$ROOT/target/systemd-nspawn"

say() { printf '[nspawn] %s\n' "$*"; }
die() {
    printf '[nspawn] ERROR: %s\n' "$*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 path/to/emberd"
[ -x "$1" ] || die "no emberd binary at $1"
BIN="$(realpath "$1")"
ORT_LIB="$(realpath "${ORT_DYLIB_PATH:-$ROOT/vendor/onnxruntime/lib/libonnxruntime.so}")"
MODEL="$ROOT/models/smollm2-135m-instruct"
[ -f "$ORT_LIB" ] || die "no ONNX Runtime library at $ORT_LIB (run scripts/setup.sh)"
[ -f "$MODEL/model.onnx" ] || die "no default model at $MODEL (run scripts/setup.sh)"
cannot() {
    printf '[nspawn] cannot run here: %s\n' "$*" >&2
    exit 3
}
[ "$(id -u)" -eq 0 ] || cannot "systemd-nspawn needs root"
command -v systemd-nspawn >/dev/null || cannot "systemd-nspawn not found (Debian: apt-get install systemd-container)"
command -v unshare >/dev/null || cannot "unshare not found (Debian: util-linux)"

STAGE="$(mktemp -d /tmp/emberd-nspawn.XXXXXX)"
MACHINE="emberd-test-$$"
NSPAWN_PID=""
LEADER_PID=""

# Ends the container: SIGTERM makes nspawn ask the container's systemd for an orderly halt;
# if that does not happen in 20 s, SIGKILL the container's PID 1 (which ends every process
# in its PID namespace) and nspawn itself.
stop_container() {
    kill -TERM "$NSPAWN_PID" 2>/dev/null || return 0
    local waited=0
    while kill -0 "$NSPAWN_PID" 2>/dev/null; do
        [ "$waited" -lt 20 ] || break
        sleep 1
        waited=$((waited + 1))
    done
    kill -0 "$NSPAWN_PID" 2>/dev/null || return 0
    say "the container did not halt; killing it"
    [ -z "$LEADER_PID" ] || kill -KILL "$LEADER_PID" 2>/dev/null || true
    kill -KILL "$NSPAWN_PID" 2>/dev/null || true
}

cleanup() {
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        stop_container
    fi
    # Without systemd on the host /run is no tmpfs, and nspawn refuses to remove what it left
    # in /run/systemd: remove this machine's part, and the shared rest (image locks of killed
    # containers included) only when no other nspawn may be using it.
    rm -rf "/run/systemd/nspawn/propagate/$MACHINE" "/run/systemd/nspawn/unix-export/$MACHINE"
    if ! pgrep -x systemd-nspawn >/dev/null; then
        rm -rf /run/systemd/nspawn
        rmdir /run/systemd/nspawn-root 2>/dev/null || true
    fi
    # $STAGE/root held the bind mount of / only inside the private mount namespace; if it is
    # not an empty directory here, something is wrong: leave everything alone.
    if rmdir "$STAGE/root" 2>/dev/null; then
        rm -rf "$STAGE"
    else
        say "WARNING: $STAGE/root is not empty; not removing $STAGE"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- What goes into the container ---------------------------------------------------------------
mkdir -p "$STAGE/root" "$STAGE/results" "$STAGE/emberd.service.d" "$STAGE/sockets.target.wants"

# The only differences from an installed emberd: the binary under test, a 5 s watchdog (the
# real 30 s would make the test slow) and the test-only hooks (a hang, a denied system call).
# The hardening is untouched.
cat >"$STAGE/emberd.service.d/test.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/usr/local/bin/emberd serve --config /etc/emberd/emberd.toml
WatchdogSec=5s
Environment=EMBERD_DEBUG_HANG_ON_PROMPT=emberd-test-hang-now
Environment=EMBERD_DEBUG_DENIED_SYSCALL=1
EOF

# backend = "auto" as installed; the check fails if emberd fell back to tract.
cat >"$STAGE/emberd.toml" <<'EOF'
[model]
dir = "/usr/lib/emberd/models/smollm2-135m-instruct"
ort_library = "/usr/lib/emberd/libonnxruntime.so"
backend = "auto"
providers = ["cpu"]
threads = 2

[socket]
enabled = true
path = "/run/emberd/emberd.sock"

[mqtt]
enabled = false

[log]
level = "info"
journald = "on"
EOF

# What `systemctl enable emberd.socket` creates; emberd.service is not enabled.
ln -s /etc/systemd/system/emberd.socket "$STAGE/sockets.target.wants/emberd.socket"

cat >"$STAGE/emberd-check.service" <<'EOF'
[Unit]
Description=emberd checks under systemd (tests/systemd/check.sh)
Wants=emberd.socket
After=emberd.socket
# The container powers off when the check ends, however it ends.
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/bin/bash /emberd-test/check.sh
TimeoutStartSec=240
EOF

# A minimal boot: sysinit and the sockets (emberd.socket among them) and the check; the
# services this host enables for itself (databases, brokers, timers) stay off.
cat >"$STAGE/emberd-check.target" <<'EOF'
[Unit]
Description=emberd test boot
Wants=sockets.target emberd-check.service
After=sockets.target
AllowIsolate=yes
EOF

# --volatile=overlay: the host's tree as it is (its /etc and /var included), every write
# going to a tmpfs overlay that vanishes with the container, and mount points creatable
# anywhere for the binds. (--volatile=yes has an empty /etc and a read-only /usr, so nspawn
# cannot create /usr/lib/emberd; --volatile=state leaves only /var writable and fails on
# the first mount point.) nspawn refuses --directory=/ with an overlay, and a recursive view
# of / brings the host's populated /dev, which it also refuses; so in a private mount
# namespace a non-recursive bind of / at $STAGE/root serves as the container's tree.
# --register=no --keep-unit: otherwise nspawn asks the host's systemd, over the system bus,
# for a scope; the host may have neither (no systemd as PID 1).
nspawn=(
    systemd-nspawn
    --directory="$STAGE/root"
    --volatile=overlay
    --register=no
    --keep-unit
    --link-journal=no
    --private-network
    --machine="$MACHINE"
    --console=read-only
    --bind-ro="$BIN:/usr/local/bin/emberd"
    --bind-ro="$ORT_LIB:/usr/lib/emberd/libonnxruntime.so"
    --bind-ro="$MODEL:/usr/lib/emberd/models/smollm2-135m-instruct"
    --bind-ro="$STAGE/emberd.toml:/etc/emberd/emberd.toml"
    --bind-ro="$ROOT/systemd/emberd.service:/etc/systemd/system/emberd.service"
    --bind-ro="$ROOT/systemd/emberd.socket:/etc/systemd/system/emberd.socket"
    --bind-ro="$STAGE/emberd.service.d:/etc/systemd/system/emberd.service.d"
    --bind-ro="$STAGE/sockets.target.wants:/etc/systemd/system/sockets.target.wants"
    --bind-ro="$STAGE/emberd-check.service:/etc/systemd/system/emberd-check.service"
    --bind-ro="$STAGE/emberd-check.target:/etc/systemd/system/emberd-check.target"
    --bind-ro="$HERE/check.sh:/emberd-test/check.sh"
    --bind="$STAGE/results:/emberd-results"
    --boot
    --
    systemd.unit=emberd-check.target
    systemd.log_color=0
)

say "booting $MACHINE (systemd-nspawn, timeout ${TIMEOUT_S}s)"
started=$SECONDS
# shellcheck disable=SC2016 # $0 and $@ belong to the inner sh
unshare --mount --propagation private -- \
    sh -c 'mount --bind / "$0" && exec "$@"' "$STAGE/root" "${nspawn[@]}" \
    >"$STAGE/results/console.log" 2>&1 </dev/null &
NSPAWN_PID=$!

timed_out=0
while kill -0 "$NSPAWN_PID" 2>/dev/null; do
    # The container's PID 1 is nspawn's child: remembered so a stuck container can be killed.
    [ -n "$LEADER_PID" ] || LEADER_PID="$(pgrep -P "$NSPAWN_PID" | head -n 1 || true)"
    if [ $((SECONDS - started)) -ge "$TIMEOUT_S" ]; then
        say "timed out after ${TIMEOUT_S}s; stopping the container"
        timed_out=1
        stop_container
        break
    fi
    sleep 1
done
nspawn_rc=0
wait "$NSPAWN_PID" || nspawn_rc=$?
NSPAWN_PID=""
elapsed=$((SECONDS - started))

# --- Results --------------------------------------------------------------------------------------
rm -rf "$OUT"
mkdir -p "$OUT"
cp -r "$STAGE/results/." "$OUT/"

# No check ever started: this machine cannot boot a container at all (no privileges for
# namespaces or mounts, say). Exit 3 so the test command can tell that apart from a failure.
if [ ! -s "$OUT/progress" ] && [ ! -s "$OUT/checks" ]; then
    say "systemd-nspawn could not boot a container here (nspawn exit $nspawn_rc); console:"
    tail -n 15 "$OUT/console.log" 2>/dev/null | sed 's/^/  /'
    exit 3
fi

problems=()
[ "$timed_out" -eq 0 ] || problems+=("the container did not power off within ${TIMEOUT_S}s")
[ "$nspawn_rc" -eq 0 ] || problems+=("systemd-nspawn exited $nspawn_rc")
[ -f "$OUT/finished" ] || problems+=("the in-container check did not finish (see $OUT/console.log, $OUT/progress)")
[ -s "$OUT/checks" ] || problems+=("no check results")

say "checks (container up ${elapsed}s):"
[ ! -f "$OUT/checks" ] || sed 's/^/  /' "$OUT/checks"
say "figures:"
[ ! -f "$OUT/figures" ] || sed 's/^/  /' "$OUT/figures"
if [ -f "$OUT/checks" ]; then
    while IFS= read -r line; do
        problems+=("$line")
    done < <(grep '^FAIL' "$OUT/checks" || true)
fi

if [ ${#problems[@]} -gt 0 ]; then
    say "FAILED:"
    printf '  %s\n' "${problems[@]}"
    if [ -f "$OUT/journal-emberd.txt" ]; then
        say "emberd's journal (tail; all of it in $OUT):"
        tail -n 30 "$OUT/journal-emberd.txt" | sed 's/^/  /'
    elif [ -f "$OUT/console.log" ]; then
        say "container console (tail):"
        tail -n 30 "$OUT/console.log" | sed 's/^/  /'
    fi
    exit 1
fi
say "all checks passed (logs in $OUT)"
