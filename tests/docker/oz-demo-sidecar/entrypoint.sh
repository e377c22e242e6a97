#!/bin/sh
# oz-demo-agent: a stand-in for the warp-agent sidecar's entrypoint, for tests only.
#
# Invoked like the real one: /agent/entrypoint.sh agent run --task-id ID --sandboxed
# --server-root-url URL ... It prints its argv and the NAMES of its environment variables
# (never the values: they carry credentials), fetches its run from the server with
# WARP_API_KEY, prints the prompt and obeys it. Command words are case-insensitive and run
# in order; other words are ignored:
#   sleep N     sleep N seconds (in a child process, so SIGTERM ends the agent at once)
#   allocate N  touch N MiB with /agent/bin/hog (to provoke the OOM killer); if that fails,
#               exit with its status (137 when the OOM killer took it)
#   read PATH   print the file; exit 1 if it cannot be read
#   write PATH  create the file and remove it again (a writability probe); exit 1 if it fails
#   exit N      exit with status N
#   fail        exit with status 1
# After the last word it prints a greeting and exits 0.
# If the run cannot be fetched it says why and exits 2.
#
# OZ_DEMO_PROMPT: when set, it is the prompt and nothing is fetched. Only the backend-level
# tests (agent/node/tests/docker_backend.rs) use it: they run without a server. Full-path
# tests leave it unset and serve the run over loopback (container network mode host).

set -u
say() { printf 'oz-demo-agent: %s\n' "$*"; }

say "argv: $*"
# One entry per line even when a value holds newlines (they become spaces, NULs become
# newlines), then each is cut at its first '=' so only the name is printed. cat's own
# environment is the exported one (a plain redirect of /proc/self/environ reads empty in
# busybox sh here).
say "env names: $(cat /proc/self/environ | tr '\n\000' ' \n' | sed 's/=.*//' | sort | tr '\n' ' ')"

task_id=""
server_url="${WARP_SERVER_ROOT_URL:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --task-id) task_id="${2:-}"; shift ;;
        --server-root-url) server_url="${2:-}"; shift ;;
    esac
    shift
done

if [ -n "${OZ_DEMO_PROMPT+set}" ]; then
    prompt="$OZ_DEMO_PROMPT"
else
    if [ -z "$task_id" ] || [ -z "$server_url" ]; then
        say "cannot fetch the run: need --task-id and --server-root-url"
        exit 2
    fi
    url="${server_url%/}/api/v1/agent/runs/$task_id"
    # stderr is folded into the captured output so a failure can be reported; with -q a
    # successful fetch writes nothing to stderr.
    if ! body=$(wget -q -O - --header "Authorization: Bearer ${WARP_API_KEY:-}" "$url" 2>&1); then
        say "fetching $url failed: $body"
        exit 2
    fi
    prompt=$(printf '%s' "$body" | sed -n 's/.*"prompt"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n 1)
fi
say "prompt: $prompt"

child=""
on_signal() {
    say "received $1, stopping"
    [ -n "$child" ] && kill "$child" 2>/dev/null
    exit "$2"
}
trap 'on_signal SIGTERM 143' TERM
trap 'on_signal SIGINT 130' INT

# Words split on whitespace; a command word is compared lower-cased without trailing
# punctuation, its argument is taken as written (paths are case-sensitive).
set -f
# shellcheck disable=SC2086 # word splitting is the point
set -- $prompt
while [ $# -gt 0 ]; do
    word=$(printf '%s' "$1" | tr 'A-Z' 'a-z' | tr -d '.,;:!?')
    arg="${2:-}"
    number="${arg%%[!0-9]*}"
    case "$word" in
        sleep)
            if [ -n "$number" ]; then
                say "sleeping $number s"
                sleep "$number" &
                child=$!
                wait "$child"
                child=""
                shift
            fi
            ;;
        allocate)
            if [ -n "$number" ]; then
                say "allocating $number MiB"
                /agent/bin/hog "$number" &
                child=$!
                wait "$child"
                status=$?
                child=""
                [ "$status" -eq 0 ] || { say "allocation failed with status $status"; exit "$status"; }
                shift
            fi
            ;;
        read)
            if [ -n "$arg" ]; then
                content=$(cat "$arg") || { say "cannot read $arg"; exit 1; }
                say "read $arg: $content"
                shift
            fi
            ;;
        write)
            if [ -n "$arg" ]; then
                { echo probe > "$arg" && rm -f "$arg"; } 2>/dev/null || { say "cannot write $arg"; exit 1; }
                say "wrote $arg"
                shift
            fi
            ;;
        exit)
            if [ -n "$number" ]; then
                say "exiting with $number"
                exit "$number"
            fi
            ;;
        fail)
            say "failing as asked"
            exit 1
            ;;
    esac
    shift
done
say "hello from the oz demo agent (task ${task_id:-unknown})"
exit 0
