# Sourced by the benchmark drivers (bench_dma.sh, bench_viommu.sh): the checks, the run
# directory with its cleanup, and the copies of the binaries they all make.
# shellcheck shell=bash

# bench_setup SCRIPT NAME BIN_DIR GUEST_ELF: checks that the binaries and QEMU are there,
# makes WORK (a run directory on the local filesystem, not a tmpfs: /var/tmp), removed at
# exit unless KEEP=1, and copies ferry, ferry-remote and the guest into WORK/bin, so that a
# rebuild during the run cannot mix two versions. The driver started in the background
# goes into PY: the cleanup ends it.
bench_setup() {
    local script=$1 name=$2 bin_dir=$3 guest=$4 f
    for f in "$bin_dir/ferry" "$bin_dir/ferry-remote" "$guest"; do
        [ -e "$f" ] || { echo "$script: $f missing (scripts/dev_cli.sh build)" >&2; exit 1; }
    done
    command -v qemu-system-x86_64 >/dev/null ||
        { echo "$script: no qemu-system-x86_64 (apt-get install qemu-system-x86)" >&2; exit 1; }
    WORK=$(mktemp -d "/var/tmp/ferry-$name.XXXXXX")
    PY=
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM HUP
    mkdir -p "$WORK/bin"
    cp -p "$bin_dir/ferry" "$bin_dir/ferry-remote" "$guest" "$WORK/bin/"
    "$WORK/bin/ferry" --version >/dev/null
}

bench_cleanup() {
    # The driver ends every process it started (and they die with it in any case).
    if [ -n "$PY" ] && kill -0 "$PY" 2>/dev/null; then
        kill -TERM "$PY" 2>/dev/null || true
        wait "$PY" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "run directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}

# A quiet machine: waits (bounded) for the 1-minute load average to drop below QUIET_LOAD
# (0.8), at most QUIET_WAIT_S seconds (900); sets QUIET_LOAD, QUIET_WAIT_S,
# QUIET_START_LOAD and QUIET_WAITED_S for the report. $1 names the script in messages.
wait_for_quiet() {
    QUIET_LOAD=${QUIET_LOAD:-0.8}
    QUIET_WAIT_S=${QUIET_WAIT_S:-900}
    local waited=0 load
    load=$(cut -d' ' -f1 /proc/loadavg)
    while awk -v l="$load" -v q="$QUIET_LOAD" 'BEGIN { exit !(l >= q) }'; do
        if [ "$waited" -ge "$QUIET_WAIT_S" ]; then
            echo "$1: the load average is still $load after ${waited} s: measuring anyway" >&2
            break
        fi
        [ $((waited % 60)) -eq 0 ] && echo "waiting for a quiet machine: load $load (want < $QUIET_LOAD)" >&2
        sleep 10
        waited=$((waited + 10))
        load=$(cut -d' ' -f1 /proc/loadavg)
    done
    # Read by the caller, which exports them to its report.
    # shellcheck disable=SC2034
    QUIET_START_LOAD=$load QUIET_WAITED_S=$waited
    echo "load average $load after waiting ${waited} s" >&2
}

# bench_hosts_setup SCRIPT NAME BIN_DIR GUEST_ELF NS_A NS_B: as bench_setup, for drivers
# that move a VM between two network-namespace hosts themselves (no QEMU needed): WORK
# and its copies of the binaries (FERRY, REMOTE, ELF), a cleanup at exit that ends this
# shell's own background jobs (no name matching) and deletes both namespaces.
bench_hosts_setup() {
    local script=$1 name=$2 bin_dir=$3 guest=$4 f
    BENCH_NS_A=$5 BENCH_NS_B=$6
    for f in "$bin_dir/ferry" "$bin_dir/ferry-remote" "$guest"; do
        [ -e "$f" ] || { echo "$script: $f missing (scripts/dev_cli.sh build)" >&2; exit 1; }
    done
    WORK=$(mktemp -d "/var/tmp/ferry-bench-$name.XXXXXX")
    trap bench_hosts_cleanup EXIT
    trap 'exit 130' INT TERM HUP
    mkdir -p "$WORK/bin"
    cp -p "$bin_dir/ferry" "$bin_dir/ferry-remote" "$guest" "$WORK/bin/"
    # Read by the caller.
    # shellcheck disable=SC2034
    FERRY=$WORK/bin/ferry REMOTE=$WORK/bin/ferry-remote ELF=$WORK/bin/$(basename "$guest")
}

bench_hosts_cleanup() {
    local p
    for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
    for p in $(jobs -p); do wait "$p" 2>/dev/null || true; done
    ip netns del "$BENCH_NS_A" 2>/dev/null || true
    ip netns del "$BENCH_NS_B" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "run directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}

# bench_two_hosts VETH ADDR_A ADDR_B: the namespaces of bench_hosts_setup (made afresh)
# joined by a veth pair VETH-va (in A, ADDR_A/30) and VETH-vb (in B, ADDR_B/30), all up.
bench_two_hosts() {
    local veth=$1 addr_a=$2 addr_b=$3 ns
    ip netns del "$BENCH_NS_A" 2>/dev/null || true
    ip netns del "$BENCH_NS_B" 2>/dev/null || true
    ip netns add "$BENCH_NS_A"; ip netns add "$BENCH_NS_B"
    ip link add "$veth-va" type veth peer name "$veth-vb"
    ip link set "$veth-va" netns "$BENCH_NS_A"; ip link set "$veth-vb" netns "$BENCH_NS_B"
    ip -n "$BENCH_NS_A" addr add "$addr_a/30" dev "$veth-va"
    ip -n "$BENCH_NS_B" addr add "$addr_b/30" dev "$veth-vb"
    for ns in "$BENCH_NS_A" "$BENCH_NS_B"; do ip -n "$ns" link set lo up; done
    ip -n "$BENCH_NS_A" link set "$veth-va" up; ip -n "$BENCH_NS_B" link set "$veth-vb" up
}
