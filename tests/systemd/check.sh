#!/usr/bin/env bash
# Runs inside the systemd-nspawn container that tests/systemd/nspawn.sh boots, as the
# oneshot emberd-check.service, with systemd as PID 1 and the repository's own emberd.socket
# and emberd.service installed. Writes one "PASS name: detail" or "FAIL name: detail" line per
# check to $RESULTS/checks, figures as key=value lines to $RESULTS/figures, and debugging
# material next to them; the unit powers the container off when this script ends.
#
# No `set -e`: every check runs and records its result even when an earlier one failed, and
# every wait is bounded.
set -uo pipefail

RESULTS=/emberd-results
EMBERD=/usr/local/bin/emberd
SOCK=/run/emberd/emberd.sock
UNIT=emberd.service
HANG_MARKER=emberd-test-hang-now
WATCHDOG_S=5 # WatchdogSec in the test drop-in
THREADS=2    # [model] threads in the test config

pass() { printf 'PASS %s: %s\n' "$1" "$2" >>"$RESULTS/checks"; }
fail() { printf 'FAIL %s: %s\n' "$1" "$2" >>"$RESULTS/checks"; }
figure() { printf '%s=%s\n' "$1" "$2" >>"$RESULTS/figures"; }
note() { printf '%s %s\n' "$(date +%T.%3N)" "$*" >>"$RESULTS/progress"; }
prop() { systemctl show "$UNIT" -p "$1" --value; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

sample_status() {
    printf '%s\t%s/%s\tStatusText=%s\n' "$1" "$(prop ActiveState)" "$(prop SubState)" \
        "$(prop StatusText)" >>"$RESULTS/status-samples"
}

# Polls CONDITION (a command) every 0.2 s for at most SECONDS; 0 when it came true.
wait_for() {
    local seconds=$1
    shift
    local until=$(($(now_ms) + seconds * 1000))
    until "$@"; do
        [ "$(now_ms)" -lt "$until" ] || return 1
        sleep 0.2
    done
}

# A request through the socket; stdout to $RESULTS/$1.out, stderr to $1.err. Bounded: a
# cold start loads the model first.
ask() {
    local name=$1 prompt=$2
    timeout 120 "$EMBERD" ask --socket "$SOCK" --max-tokens 8 --temperature 0 "$prompt" \
        >"$RESULTS/$name.out" 2>"$RESULTS/$name.err"
}

emberd_log() { journalctl -b --no-pager "_SYSTEMD_UNIT=$UNIT" "$@"; }
unit_log() { journalctl -b --no-pager -u "$UNIT" "$@"; }

# The finished-request entry with every structured field the README promises.
request_entry() {
    emberd_log -o json | grep '"REQUEST_ID"' | grep '"TRANSPORT":"socket"' | grep '"ENGINE"' |
        grep '"COMPLETION_TOKENS"' | grep '"TTFT_MS"' | tail -n 1
}
has_request_entry() { [ -n "$(request_entry)" ]; }
has_stopped_entry() { emberd_log -o cat | grep -qx 'stopped'; }
is_active() { [ "$(prop ActiveState)" = active ]; }
restarted() { [ "$(prop NRestarts)" -gt "$restarts_before" ]; }

note "check started"
: >"$RESULTS/checks"

# --- 1. Socket activation ----------------------------------------------------------------
socket_state=$(systemctl is-active emberd.socket)
service_state=$(systemctl is-active "$UNIT")
sample_status before-first-connection
if [ "$socket_state" = active ] && [ "$service_state" = inactive ] && [ -S "$SOCK" ]; then
    pass socket-listens-service-idle "emberd.socket active, $SOCK exists, $UNIT inactive"
else
    fail socket-listens-service-idle \
        "emberd.socket=$socket_state, $UNIT=$service_state, socket file: $(ls -l "$SOCK" 2>&1)"
fi

# Saved for the report; the host prints the journal's tail when a check fails.
collect_logs() {
    note "collecting logs"
    systemctl show "$UNIT" -p ActiveState -p SubState -p Result -p NRestarts -p StatusText \
        -p ExecMainStatus -p MainPID -p WatchdogUSec -p DynamicUser >"$RESULTS/show-emberd.txt"
    systemctl status --no-pager --full emberd.socket "$UNIT" >"$RESULTS/status.txt" 2>&1
    unit_log -n 200 -o short-monotonic >"$RESULTS/journal-emberd.txt"
    journalctl -b --no-pager -o short-monotonic >"$RESULTS/journal-boot.txt"
}

# How the main process ended, as systemctl status says it: "code=killed, status=31/SYS".
exit_status() {
    local code status
    code=$(prop ExecMainCode)
    status=$(prop ExecMainStatus)
    case "$code" in
        1) printf 'code=exited, status=%s' "$status" ;;
        2) printf 'code=killed, status=%s/%s' "$status" "$(kill -l "$status" 2>/dev/null)" ;;
        3) printf 'code=dumped, status=%s/%s' "$status" "$(kill -l "$status" 2>/dev/null)" ;;
        *) printf 'ExecMainCode=%s ExecMainStatus=%s' "$code" "$status" ;;
    esac
}

# The service died or is being restarted: a start that cannot succeed.
start_failed() {
    [ "$(prop Result)" != success ] || [ "$(prop ActiveState)" = failed ] ||
        [ "$(prop SubState)" = auto-restart ] || [ "$(prop NRestarts)" -gt 0 ]
}

note "first request"
started=$(now_ms)
ask first 'Say hi' &
asker=$!
# A service that fails to start ends the check at once, with its exit status and journal,
# instead of waiting out the client's timeout.
while kill -0 "$asker" 2>/dev/null; do
    if start_failed; then
        kill "$asker" 2>/dev/null
        fail service-start "$UNIT failed to start: $(exit_status), Result=$(prop Result), NRestarts=$(prop NRestarts); last lines: $(unit_log -n 6 -o cat | tr '\n' '|')"
        collect_logs
        note "check ended early: the service failed to start"
        echo finished >"$RESULTS/finished"
        exit 0
    fi
    sleep 0.2
done
wait "$asker"
rc=$?
figure first_reply_ms $(($(now_ms) - started))
if [ $rc -eq 0 ] && [ -s "$RESULTS/first.out" ]; then
    pass socket-activation "the first connection started $UNIT and was answered: $(tr '\n' ' ' <"$RESULTS/first.out")"
else
    fail socket-activation "emberd ask exited $rc; stdout: $(cat "$RESULTS/first.out"); stderr: $(cat "$RESULTS/first.err")"
fi

# The socket file stays systemd's, as emberd.socket made it (SocketMode=0660, root), in a
# plain /run/emberd: the service must not take the directory over (with DynamicUser= and a
# preserved RuntimeDirectory=emberd, systemd would move it behind /run/private, 0700, and
# chown the socket to the dynamic user, locking out every non-root client).
socket_owner=$(stat -c '%U:%G %a' "$SOCK" 2>&1)
if [ "$socket_owner" = 'root:root 660' ] && [ -d /run/emberd ] && [ ! -L /run/emberd ]; then
    pass socket-ownership "$SOCK stays root:root 0660 in a plain /run/emberd while emberd runs"
else
    fail socket-ownership "$SOCK is $socket_owner; $(namei -l "$SOCK" | tail -n +2 | tr -s ' ' | tr '\n' ';')"
fi

# --- 2. READY and how long it took ---------------------------------------------------------
sample_status after-first-request
state="$(prop ActiveState)/$(prop SubState)"
status_text=$(prop StatusText)
exec_start=$(prop ExecMainStartTimestampMonotonic)
active_enter=$(prop ActiveEnterTimestampMonotonic)
if [ "$state" = active/running ] && [ "$active_enter" -gt 0 ] 2>/dev/null; then
    ready_ms=$(((active_enter - exec_start) / 1000))
    figure ready_ms "$ready_ms"
    pass ready "$state after READY=1, ${ready_ms} ms from exec to READY; StatusText=$status_text"
else
    fail ready "state $state, ActiveEnterTimestampMonotonic=$active_enter; StatusText=$status_text"
fi

# Evidence that the hardening is in force on the running daemon (a container could silently
# lack seccomp or user namespaces) and that ONNX Runtime, not the tract fallback, serves.
pid=$(prop MainPID)
if [ "$pid" -gt 0 ] 2>/dev/null; then
    grep -E '^(Uid|Gid|NoNewPrivs|Seccomp|Seccomp_filters|CapEff|CapBnd):' "/proc/$pid/status" \
        >"$RESULTS/emberd-proc-status"
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
    nnp=$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")
    seccomp=$(awk '/^Seccomp:/ {print $2}' "/proc/$pid/status")
    capeff=$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")
    # DynamicUser= takes UIDs from 61184-65519.
    if [ "$uid" -ge 61184 ] && [ "$uid" -le 65519 ] && [ "$nnp" = 1 ] && [ "$seccomp" = 2 ] &&
        [ "$capeff" = 0000000000000000 ]; then
        pass hardening "dynamic uid $uid, NoNewPrivs=1, seccomp filter on, no capabilities"
    else
        fail hardening "uid=$uid NoNewPrivs=$nnp Seccomp=$seccomp CapEff=$capeff"
    fi
    if grep -q libonnxruntime "/proc/$pid/maps"; then
        ort_mapped=yes
    else
        ort_mapped=no
    fi
else
    fail hardening "no MainPID ($pid)"
    ort_mapped=no
fi
engine=$(request_entry | grep -o '"ENGINE":"[^"]*"' | cut -d'"' -f4)
threads_line=$(emberd_log -o cat | grep -m1 '^ONNX Runtime .* serving ')
if [ "$ort_mapped" = yes ] && [[ "$engine" == ort/* ]] && [[ "$threads_line" == *"with $THREADS threads" ]]; then
    pass onnxruntime "engine $engine; libonnxruntime.so is mapped in the daemon; $threads_line"
else
    fail onnxruntime "engine '$engine', libonnxruntime mapped: $ort_mapped; engine line: '$threads_line' (want $THREADS threads); fallback: $(emberd_log -o cat | grep -i 'falling back' | tail -n 1)"
fi
[ "$pid" -gt 0 ] 2>/dev/null && figure ort_os_threads "$(ls "/proc/$pid/task" | wc -l)"

# The test drop-in sets EMBERD_DEBUG_DENIED_SYSCALL: emberd made a call the filter denies
# (sched_setaffinity) before loading the model, and must have got EPERM and gone on.
denied_line=$(emberd_log -o cat | grep -m1 'EMBERD_DEBUG_DENIED_SYSCALL')
if [[ "$denied_line" == *"Operation not permitted"* ]] && is_active && [ "$(prop NRestarts)" = 0 ]; then
    pass denied-syscall-errors "a denied call failed with an error and emberd went on: '$denied_line'"
else
    fail denied-syscall-errors "hook said '${denied_line:-nothing}'; $UNIT $(prop ActiveState), $(exit_status), NRestarts=$(prop NRestarts)"
fi

# --- 3. journald got the structured fields ---------------------------------------------------
note "journal fields"
if wait_for 10 has_request_entry; then
    request_entry >"$RESULTS/journal-request-entry.json"
    for field in TTFT_MS TOKENS_PER_S; do
        value=$(grep -o "\"$field\":\"[^\"]*\"" "$RESULTS/journal-request-entry.json" | cut -d'"' -f4)
        figure "first_request_${field,,}" "${value%%.*}"
    done
    pass journald-fields "REQUEST_ID, TRANSPORT=socket, ENGINE, COMPLETION_TOKENS, TTFT_MS in $(wc -c <"$RESULTS/journal-request-entry.json")-byte entry"
else
    emberd_log -o json | tail -n 5 >"$RESULTS/journal-request-entry.json"
    fail journald-fields "no entry of $UNIT with all of REQUEST_ID, TRANSPORT=socket, ENGINE, COMPLETION_TOKENS, TTFT_MS (last entries saved)"
fi

# --- 4. Stop under load drains, cancels, and exits 0 ---------------------------------------------
# Eight long requests on the default batch of four: four run and four wait when systemd stops
# the service. emberd drains for 10 s, then cancels; each client must get exactly one
# terminal event (with --json, one line per event) and the service must exit 0.
LOAD=8
note "stop under load"
long_request() {
    timeout 90 "$EMBERD" ask --socket "$SOCK" --json --max-tokens 1000 --ignore-eos \
        "Tell me a very long story, number $1." >"$RESULTS/load-$1.jsonl" 2>"$RESULTS/load-$1.err"
}
loaders=()
for i in $(seq 1 $LOAD); do
    long_request "$i" &
    loaders+=($!)
done
# Once four show tokens the rest are queued. Some may have ended before the stop (the KV
# budget can hold fewer than four this long): the journal's "draining N" counts the others.
first_tokens() { [ "$(grep -l '"type":"token"' "$RESULTS"/load-*.jsonl 2>/dev/null | wc -l)" -ge 4 ]; }
wait_for 60 first_tokens
sleep 1
ended_before=$(grep -l '"type":"\(done\|error\)"' "$RESULTS"/load-*.jsonl 2>/dev/null | wc -l)
started=$(now_ms)
timeout 60 systemctl stop "$UNIT"
rc=$?
figure stop_under_load_ms $(($(now_ms) - started))
load_ends=""
load_ok=yes
for i in "${!loaders[@]}"; do
    wait "${loaders[$i]}"
    n=$((i + 1))
    terminal=$(grep -c '"type":"\(done\|error\)"' "$RESULTS/load-$n.jsonl")
    end=$(grep '"type":"\(done\|error\)"' "$RESULTS/load-$n.jsonl" |
        grep -o '"\(finish_reason\|code\)":"[^"]*"' | cut -d'"' -f4 | tr '\n' ' ')
    load_ends+="$n:${end:-none} "
    [ "$terminal" = 1 ] || load_ok=no
done
sample_status after-stop
status=$(prop ExecMainStatus)
code=$(prop ExecMainCode)
result=$(prop Result)
wait_for 5 has_stopped_entry
stopped_logged=$?
draining_line=$(emberd_log -o cat | grep -m1 '^shutting down: draining')
draining=$(echo "$draining_line" | grep -o '[0-9]*')
cancelled=$(grep -l '"finish_reason":"cancelled"' "$RESULTS"/load-*.jsonl 2>/dev/null | wc -l)
figure stop_under_load_cancelled "$cancelled"
if [ $rc -eq 0 ] && [ "$status" = 0 ] && [ "$code" = 1 ] && [ "$result" = success ] &&
    [ $stopped_logged -eq 0 ] && [ "$load_ok" = yes ] && [ "$cancelled" -ge 1 ] &&
    [ "${draining:-0}" -ge 1 ] && [ "$draining" -le $((LOAD - ended_before)) ]; then
    pass stop-drains "under load: '$draining_line', one terminal event each ($load_ends), exit 0, Result=success, 'stopped' logged"
else
    fail stop-drains "systemctl stop rc=$rc ExecMainCode=$code ExecMainStatus=$status Result=$result; 'stopped' in journal: $([ $stopped_logged -eq 0 ] && echo yes || echo no); journal: '${draining_line:-no draining line}' (want 1 to $((LOAD - ended_before)): $ended_before ended before the stop); ends (want one each, >= 1 cancelled): $load_ends"
fi
socket_state=$(systemctl is-active emberd.socket)
if [ "$socket_state" = active ] && [ -S "$SOCK" ]; then
    pass socket-survives-stop "emberd.socket still listening on $SOCK"
else
    fail socket-survives-stop "emberd.socket=$socket_state, socket file: $(ls -l "$SOCK" 2>&1)"
fi

# --- 5. A hung engine gets the service restarted by the watchdog --------------------------------
note "second activation"
ask reactivated 'Say hi'
rc=$?
if [ $rc -eq 0 ] && [ -s "$RESULTS/reactivated.out" ] && is_active; then
    pass reactivation "a connection after the stop started $UNIT again and was answered"
else
    fail reactivation "emberd ask exited $rc; stderr: $(cat "$RESULTS/reactivated.err"); $UNIT $(prop ActiveState)"
fi
sample_status before-hang
pid_before=$(prop MainPID)
restarts_before=$(prop NRestarts)

note "hang request"
started=$(now_ms)
# The client would wait forever for the hung engine; it gives up after a while.
timeout 5 "$EMBERD" ask --socket "$SOCK" --max-tokens 8 "please hang: $HANG_MARKER" \
    >"$RESULTS/hang.out" 2>"$RESULTS/hang.err" &
hang_client=$!
# WatchdogSec=5: emberd stops pinging once the worker is silent for 5 s, systemd gives up 5 s
# after the last ping (up to 2 x WatchdogSec after the hang), then RestartSec=2.
if wait_for $((WATCHDOG_S * 4 + 5)) restarted; then
    figure watchdog_restart_ms $(($(now_ms) - started))
fi
wait "$hang_client" 2>/dev/null
sample_status after-hang
restarts=$(prop NRestarts)
watchdog_line=$(unit_log -o cat | grep -m1 'Watchdog timeout')
if [ "$restarts" -gt "$restarts_before" ] && [ -n "$watchdog_line" ]; then
    pass watchdog-restart "NRestarts $restarts_before -> $restarts; systemd: '$watchdog_line'"
else
    fail watchdog-restart "NRestarts $restarts_before -> $restarts; 'Watchdog timeout' in journal: ${watchdog_line:-none}"
fi
if emberd_log -o cat | grep -q 'EMBERD_DEBUG_HANG_ON_PROMPT matched'; then
    pass hang-hook "emberd logged that the engine worker hangs on the marker"
else
    fail hang-hook "no 'EMBERD_DEBUG_HANG_ON_PROMPT matched' from emberd: is the hook built in?"
fi

note "request after the restart"
started=$(now_ms)
wait_for 120 is_active
ask after-watchdog 'Say hi'
rc=$?
pid_after=$(prop MainPID)
sample_status after-restart
if [ $rc -eq 0 ] && [ -s "$RESULTS/after-watchdog.out" ] && [ "$pid_after" != "$pid_before" ]; then
    pass served-after-restart "a new emberd (pid $pid_before -> $pid_after) answered: $(tr '\n' ' ' <"$RESULTS/after-watchdog.out")"
    exec_start=$(prop ExecMainStartTimestampMonotonic)
    active_enter=$(prop ActiveEnterTimestampMonotonic)
    figure ready_after_restart_ms $(((active_enter - exec_start) / 1000))
else
    fail served-after-restart "emberd ask exited $rc (pid $pid_before -> $pid_after); stderr: $(cat "$RESULTS/after-watchdog.err")"
fi

# --- 6. tract under the same unit ----------------------------------------------------------------
# The fallback engine must run under the same filter: a runtime drop-in (gone with the
# container) forces it, the hardening untouched.
note "tract"
mkdir -p "/run/systemd/system/$UNIT.d"
printf '[Service]\nExecStart=\nExecStart=%s serve --config /etc/emberd/emberd.toml --backend tract\n' \
    "$EMBERD" >"/run/systemd/system/$UNIT.d/tract.conf"
systemctl daemon-reload
timeout 60 systemctl stop "$UNIT"
ask tract 'Say hi'
rc=$?
tract_line=$(emberd_log -o cat | grep '^tract serving ' | tail -n 1)
tract_engine=$(request_entry | grep -o '"ENGINE":"[^"]*"' | cut -d'"' -f4)
if [ $rc -eq 0 ] && [ -s "$RESULTS/tract.out" ] && [ "$tract_engine" = tract/cpu ] &&
    [[ "$tract_line" == *"with $THREADS threads" ]] && is_active && [ "$(prop NRestarts)" = 0 ]; then
    pass tract-under-unit "answered by $tract_engine under the same hardening: $(tr '\n' ' ' <"$RESULTS/tract.out"); $tract_line"
else
    fail tract-under-unit "emberd ask exited $rc, engine '$tract_engine', '$tract_line'; $(exit_status); stderr: $(cat "$RESULTS/tract.err")"
fi
pid=$(prop MainPID)
[ "$pid" -gt 0 ] 2>/dev/null && figure tract_os_threads "$(ls "/proc/$pid/task" | wc -l)"

# --- 7. systemd's own exposure figure for the installed unit --------------------------------------
# tests/service.rs checks the unit file offline; this is the unit as systemd loaded it here.
note "security"
systemd-analyze security --no-pager "$UNIT" >"$RESULTS/security.txt" 2>&1
exposure=$(grep -o 'Overall exposure level for [^:]*: [0-9.]*' "$RESULTS/security.txt" | awk '{print $NF}')
figure exposure "${exposure:-none}"
if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 1.5) }'; then
    pass security-exposure "systemd-analyze security: $exposure (at most 1.5)"
else
    fail security-exposure "systemd-analyze security gave '${exposure:-no figure}' (want at most 1.5); its worst lines: $(grep '✗' "$RESULTS/security.txt" | head -n 5 | tr -s ' ' | tr '\n' '|')"
fi

# --- 8. Material for debugging -------------------------------------------------------------------
collect_logs
note "check finished"
echo finished >"$RESULTS/finished"
