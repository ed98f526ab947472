#!/usr/bin/env bash
# Ferry's entry points: build, tests, demo (the main job), bench, soak, fuzz.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian packages the tests and benchmarks use, installed when missing.
ensure_packages() {
    local missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v iasl >/dev/null || missing+=(acpica-tools)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v python3 >/dev/null || missing+=(python3)
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        if [ "$(id -u)" -ne 0 ]; then
            echo "dev_cli.sh: need root to apt-get install ${missing[*]}" >&2
            exit 1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# schemathesis (pinned) in a virtualenv under target/, for vmm/tests/api_schemathesis.rs,
# which runs it against docs/api/ferry.yaml through $FERRY_SCHEMATHESIS.
SCHEMATHESIS_VERSION=4.32.5
QEMU_QMP_VERSION=0.0.6
ensure_schemathesis() {
    local venv="$ROOT/target/schemathesis-venv"
    local st="$venv/bin/st"
    local have=
    if [ -x "$st" ]; then
        have=$("$venv/bin/python3" -c \
            'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null || true)
    fi
    if [ "$have" != "$SCHEMATHESIS_VERSION" ]; then
        if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
            if [ "$(id -u)" -ne 0 ]; then
                echo "dev_cli.sh: need root to apt-get install python3-venv" >&2
                exit 1
            fi
            say "installing python3-venv"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        fi
        say "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python3" -m pip install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
    fi
    export FERRY_SCHEMATHESIS="$st"
    # QEMU's own QMP client (PyPI qemu.qmp, pinned; it brings qmp-shell) in the same
    # virtualenv, for vmm/tests/qmp.rs through $FERRY_QMP_PYTHON.
    if ! "$venv/bin/python3" -c "import importlib.metadata as m, sys; \
            sys.exit(m.version('qemu.qmp') != '$QEMU_QMP_VERSION')" 2>/dev/null; then
        say "installing qemu.qmp $QEMU_QMP_VERSION into $venv"
        "$venv/bin/python3" -m pip install -q --disable-pip-version-check "qemu.qmp==$QEMU_QMP_VERSION"
    fi
    export FERRY_QMP_PYTHON="$venv/bin/python3"
}

check_kvm() {
    if [ ! -c /dev/kvm ] || [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        echo "dev_cli.sh: /dev/kvm is missing or not accessible: Ferry needs KVM" >&2
        exit 1
    fi
}

build() {
    say "building release binaries"
    cargo build --release --workspace --bins
    say "building the test guest"
    test_guest/build.sh
}

tests() {
    check_kvm
    ensure_packages
    build
    say "cargo fmt --check"
    cargo fmt --all -- --check
    say "cargo clippy"
    cargo clippy --workspace --all-targets --release -- -D warnings
    ensure_schemathesis
    say "cargo test"
    cargo test --workspace --release -- --test-threads=2
}

demo() {
    check_kvm
    ensure_packages
    build
    "$ROOT/scripts/demo.sh"
}

bench() {
    check_kvm
    case "${1:-}" in
        harvest)
            cargo bench -p hypervisor --bench harvest
            ;;
        migration)
            ensure_packages
            build
            "$ROOT/scripts/bench_migration.sh"
            ;;
        vs-qemu)
            ensure_packages
            build
            "$ROOT/scripts/bench_vs_qemu.sh"
            ;;
        first-touch)
            "$ROOT/scripts/bench_first_touch.py"
            ;;
        rings)
            "$ROOT/scripts/bench_rings.sh"
            ;;
        dma)
            ensure_packages
            build
            say "what one mark in the device dirty log costs (devices/benches/dirty_marks.rs)"
            cargo bench -q -p devices --bench dirty_marks
            "$ROOT/scripts/bench_dma.sh"
            ;;
        viommu)
            ensure_packages
            build
            # The MAP/UNMAP micro-benchmark (devices/benches/viommu_requests.rs) runs
            # inside, after the wait for a quiet machine.
            "$ROOT/scripts/bench_viommu.sh"
            ;;
        vfio-user)
            ensure_packages
            build
            # The harvest micro-benchmark (dma_device/benches/log_harvest.rs) runs inside,
            # after the wait for a quiet machine.
            "$ROOT/scripts/bench_vfio_user.sh"
            ;;
        tls)
            ensure_packages
            build
            "$ROOT/scripts/bench_tls.sh"
            ;;
        dirty-limit)
            ensure_packages
            build
            "$ROOT/scripts/bench_dirty_limit.sh"
            ;;
        *)
            echo "usage: dev_cli.sh bench harvest|migration|vs-qemu|first-touch|rings|dma|viommu|vfio-user|tls|dirty-limit" >&2
            exit 2
            ;;
    esac
}

soak() {
    check_kvm
    ensure_packages
    build
    "$ROOT/scripts/soak.sh" "$@"
}

fuzz() {
    # The logic and the per-target settings (-max_len) are in scripts/fuzz.sh.
    "$ROOT/scripts/fuzz.sh" "$@"
}

usage() {
    cat >&2 <<USAGE
usage: scripts/dev_cli.sh <command>
  demo            build, boot the test guest and run Ferry's main job end to end
  build           release binaries into target/release/, test guest into target/test-guest/
  tests           every test (needs /dev/kvm; installs qemu-system-x86, iproute2, acpica-tools)
                  and schemathesis into target/schemathesis-venv
  bench harvest   dirty-set collection time, rings vs bitmap
  bench migration live-migration time, downtime, bytes, throughput between two hosts
  bench vs-qemu   the same guests live-migrated by QEMU and by Ferry, side by side
  bench first-touch  the host's cost of faulting in fresh memory (caps a destination)
  bench rings     dirty-ring reliability loop: ring tests N times on KVM (hangs, lost pages)
  bench dma       virtio-blk throughput in the guest (Ferry log on/off, QEMU) and a DMA
                  guest migrated by Ferry and by QEMU
  bench viommu    virtio-iommu: MAP/UNMAP requests per second, virtio-blk throughput with
                  the vIOMMU on and off (Ferry, QEMU), the iommu=on guest migrated by both
  bench vfio-user vfio-user devices: one harvest of the device's DMA log against region
                  size, the vfio-user guest (iommu off/on) migrated between two hosts
  bench tls       the same guest migrated between two hosts over plain TCP and over TLS
                  (tls_dir), 1 and 2 connections: time, MiB/s, ratio
  bench dirty-limit  a guest dirtying faster than a rate-limited link, migrated without
                  auto-converge, with it, and with QMP's set-vcpu-dirty-limit
  soak [N]        the verify guest ping-ponged between two namespace hosts N times
                  (default 100): runs, failures, lost pages (docs/benchmarks/soak.md)
  fuzz [TARGET] [SECONDS]
                  cargo-fuzz targets (fuzz/), each from a scratch copy of its seeds for
                  SECONDS (default 60), or TARGET alone; exits 1 on a crash (needs nightly
                  and cargo-fuzz; see docs/fuzzing.md)
USAGE
    exit 2
}

cmd=${1:-}
shift || true
case "$cmd" in
    build) build ;;
    tests) tests ;;
    demo) demo ;;
    bench) bench "$@" ;;
    fuzz) fuzz "$@" ;;
    soak) soak "$@" ;;
    *) usage ;;
esac
