#!/usr/bin/env bash
# Runs Ferry's cargo-fuzz targets (fuzz/) with a bound: scripts/dev_cli.sh fuzz [TARGET] [SECONDS].
#
# Builds every target once (cargo +nightly fuzz build, release), then runs TARGET, or every
# target in turn, for SECONDS (default 60) each, from a scratch corpus seeded with a copy of
# fuzz/seeds/TARGET/ (the repository's seeds are never written). Prints one summary line per
# target and exits 1 if any target left a crash, leak, timeout or OOM artifact (named).
#
# Environment:
#   FUZZ_WORK=DIR       scratch directory (default: a new mktemp -d under /tmp; kept)
#   FUZZ_NO_SEEDS=1     start from an empty corpus (to measure what the seeds bring)
#   FUZZ_JOBS=N         libFuzzer -fork=N (default: one process)
#   CARGO_TARGET_DIR    where cargo-fuzz builds (default fuzz/target)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR="$ROOT/fuzz"

# The per-target settings, in one place: target name, then libFuzzer's -max_len in bytes.
# migration_stream: a memory chunk of a few 4 KiB pages is well past libFuzzer's default
# 4096; http_request and api_body: heads up to MAX_HEAD (16 KiB) and bodies beside them.
TARGETS=(
    "http_request           65536"
    "api_body               65536"
    "migration_stream     1048576"
    "viommu_requests         4096"
    "virtio_blk_request      4096"
    "virtio_descriptor_chain 4096"
    "vfio_user_messages     16384"
    "memory_chunks        1048576"
    "kernel_images          65536"
    "api_reply              65536"
    "cli_options             4096"
    "peer_state             65536"
    "receive_session      1048576"
    "device_state           65536"
    "memory_files            4096"
    "unix_fds                4096"
    "kernel_files           65536"
)

target_names() {
    local t
    for t in "${TARGETS[@]}"; do
        printf '%s ' "${t%% *}"
    done
}

max_len_of() {
    local t name len
    for t in "${TARGETS[@]}"; do
        read -r name len <<<"$t"
        if [ "$name" = "$1" ]; then
            echo "$len"
            return 0
        fi
    done
    return 1
}

usage() {
    echo "usage: scripts/dev_cli.sh fuzz [TARGET] [SECONDS]   (TARGET one of: $(target_names))" >&2
    exit 2
}

target=${1:-}
seconds=${2:-60}
if [ "$target" = all ]; then
    target=
fi
if [ -n "$target" ] && ! max_len_of "$target" >/dev/null; then
    echo "fuzz: unknown target '$target'; known targets: $(target_names)" >&2
    exit 2
fi
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz: SECONDS must be a positive whole number, not '$seconds'" >&2
    usage
fi
# Every [[bin]] of fuzz/Cargo.toml must have its settings above.
while read -r bin; do
    if [ "$bin" != ferry-fuzz ] && ! max_len_of "$bin" >/dev/null; then
        echo "fuzz: $bin is in fuzz/Cargo.toml but has no settings in scripts/fuzz.sh" >&2
        exit 2
    fi
done < <(sed -n 's/^name = "\(.*\)"$/\1/p' "$FUZZ_DIR/Cargo.toml")

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: needs cargo-fuzz and a nightly toolchain (cargo install cargo-fuzz; rustup toolchain install nightly)" >&2
    exit 1
fi

printf '\033[1m==> %s\033[0m\n' "building the fuzz targets (cargo +nightly fuzz build)" >&2
(cd "$FUZZ_DIR" && cargo +nightly fuzz build)
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
# cargo ran in fuzz/, so a relative CARGO_TARGET_DIR is relative to it.
target_dir=${CARGO_TARGET_DIR:-target}
case "$target_dir" in
    /*) ;;
    *) target_dir="$FUZZ_DIR/$target_dir" ;;
esac
bin_dir="$target_dir/$triple/release"

work=${FUZZ_WORK:-$(mktemp -d /tmp/ferry-fuzz.XXXXXX)}
mkdir -p "$work"

if [ -n "$target" ]; then
    run=("$target")
else
    read -r -a run <<<"$(target_names)"
fi

failed=()
summaries=()
for t in "${run[@]}"; do
    max_len=$(max_len_of "$t")
    dir="$work/$t"
    rm -rf "$dir"
    mkdir -p "$dir/corpus" "$dir/artifacts"
    if [ "${FUZZ_NO_SEEDS:-0}" != 1 ] && [ -d "$FUZZ_DIR/seeds/$t" ]; then
        cp -r "$FUZZ_DIR/seeds/$t/." "$dir/corpus/"
    fi
    seeds=$(find "$dir/corpus" -type f | wc -l)
    args=(
        "$dir/corpus"
        "-max_len=$max_len"
        "-max_total_time=$seconds"
        "-print_final_stats=1"
        "-artifact_prefix=$dir/artifacts/"
    )
    if [ -n "${FUZZ_JOBS:-}" ]; then
        args+=("-fork=$FUZZ_JOBS" "-ignore_crashes=0")
    fi
    printf '\033[1m==> %s\033[0m\n' "$t: ${seconds}s, -max_len=$max_len, $seeds seed(s), log $dir/log" >&2
    echo "$bin_dir/$t ${args[*]}" >"$dir/command"
    rc=0
    "$bin_dir/$t" "${args[@]}" >"$dir/log" 2>&1 || rc=$?
    # The last status line has cov: and ft:; the final stats the execs.
    status=$(grep -E '^#[0-9]+' "$dir/log" | tail -n 1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$status")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$status")
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/log" | tail -n 1)
    if [ -z "$execs" ]; then
        # -fork prints no final stats: the last status line counts the execs.
        execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$status")
        rate=$(sed -n 's/.* exec\/s: \([0-9]*\).*/\1/p' <<<"$status")
    fi
    corpus=$(find "$dir/corpus" -type f | wc -l)
    mapfile -t artifacts < <(find "$dir/artifacts" -type f | sort)
    line=$(printf '%-24s execs %-10s (%s/s)  cov %-6s ft %-6s corpus %-6s crashes %s' \
        "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$corpus" "${#artifacts[@]}")
    summaries+=("$line")
    echo "$line"
    if ((${#artifacts[@]})) || [ "$rc" -ne 0 ]; then
        failed+=("$t")
        for a in "${artifacts[@]}"; do
            echo "  artifact: $a  (reproduce: $bin_dir/$t $a)"
        done
        if [ "$rc" -ne 0 ]; then
            echo "  libFuzzer exited $rc; see $dir/log:"
            grep -E 'ERROR|panicked|SUMMARY|deadly signal' "$dir/log" | head -n 5 | sed 's/^/    /'
        fi
    fi
done

if ((${#run[@]} > 1)); then
    echo
    echo "summary (scratch: $work)"
    printf '%s\n' "${summaries[@]}"
fi
if ((${#failed[@]})); then
    echo "fuzz: FAILED: ${failed[*]} (artifacts under $work)" >&2
    exit 1
fi
echo "fuzz: no crash (scratch: $work)"
