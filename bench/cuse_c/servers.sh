# shellcheck shell=bash
# What compare.sh, floor.sh and ab.sh share, sourced by them in the VM from
# the repository root.  Sourcing it loads cuse, builds bench/cuse_c and
# arranges for every server started here to get SIGTERM on exit.
#
#   start_c_server NAME                 the C server as /dev/NAME
#   start_daemon NAME [DIR [MODULE [ARG...]]]
#                                       python -m MODULE (default cuse_ksm) run
#                                       from DIR (default .) as /dev/NAME; ARGs,
#                                       if any, replace --no-stats-dir
#   stop_server NAME                    SIGTERM, then its exit status
#   wait_for_servers                    until every server's node is up
#   load CPUS MODE PROCS SECONDS NAME   ksm_load against /dev/NAME, clients
#                                       on CPUS: prints its RESULT line; fails
#                                       if a call failed or there is no result
#   field LINE KEY                      one number of a RESULT line
#
# server_pid[NAME] is each server's pid.  The caller defines say() and PYTHON.

declare -A server_pid=()
trap 'kill -TERM "${server_pid[@]}" 2>/dev/null; wait' EXIT
modprobe cuse || { say "no cuse module"; exit 1; }
make -s -C bench/cuse_c || exit 1

start_c_server() {
    bench/cuse_c/bin/ksm_cuse -f -s --name "$1" &
    server_pid[$1]=$!
}

start_daemon() {
    # From DIR: `python -m` puts the cwd first on sys.path, so DIR's cuse_ksm runs.
    local name=$1 dir=${2:-.} module=${3:-cuse_ksm}
    shift $(($# < 3 ? $# : 3))
    (($#)) || set -- --no-stats-dir
    (cd "$dir" && exec "$PYTHON" -m "$module" --name "$name" --log-level warning "$@") &
    server_pid[$name]=$!
}

stop_server() {
    local pid=${server_pid[$1]} rc
    unset "server_pid[$1]"
    kill -TERM "$pid"
    wait "$pid"
    rc=$?
    ((rc == 0)) || say "server $1 (pid $pid) exited with status $rc after SIGTERM"
    return "$rc"
}

wait_for_servers() {
    local name up i
    for ((i = 0; i < 300; i++)); do
        up=1
        for name in "${!server_pid[@]}"; do [[ -c /dev/$name ]] || up=0; done
        ((up)) && return 0
        sleep 0.1
    done
    say "devices did not appear"
    exit 1
}

load() {
    local line
    line=$(taskset -c "$1" bench/cuse_c/bin/ksm_load -m "$2" -p "$3" -t "$4" "/dev/$5" | tail -1)
    echo "$line"
    [[ $(field "$line" errors) == 0 ]]
}

field() {
    sed -n "s/.* $2=\([0-9]*\).*/\1/p" <<<"$1"
}
