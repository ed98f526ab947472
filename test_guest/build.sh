#!/usr/bin/env bash
# Builds Ferry's test guest into target/test-guest/guest.elf: a PVH ELF (see
# test_guest/README.md). Uses the installed stable toolchain and its only target,
# x86_64-unknown-linux-gnu: no_std, panic=abort, static, no SSE, laid out by
# test_guest/guest/link.ld. Its own target dir (target/test-guest-build) keeps it off the
# main workspace's build lock.
#
# FERRY_TEST_GUEST_TARGET=DIR builds in DIR/test-guest-build and writes DIR/test-guest/guest.elf
# instead of under target/ (for working on the guest while others use target/test-guest;
# test_guest/pattern/tests/qemu_boot.rs looks there too).
#
#   test_guest/build.sh            build (extra arguments go to `cargo build`)
#   test_guest/build.sh clippy     lint the guest crate with the same flags
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST="$ROOT/test_guest/guest"
TARGET_ROOT="${FERRY_TEST_GUEST_TARGET:-$ROOT/target}"
BUILD_DIR="$TARGET_ROOT/test-guest-build"
OUT_DIR="$TARGET_ROOT/test-guest"
TARGET=x86_64-unknown-linux-gnu

flags=(
    -C panic=abort
    -C relocation-model=static
    -C code-model=small
    -C target-cpu=x86-64
    # No SSE anywhere: under a hypervisor that emulates guest ring-0 code (see
    # guest/src/sys.rs) SSE instructions cannot be emulated. With fat LTO this covers
    # core too. rustc warns that the x86_64 ABI wants SSE2; the guest has no floats.
    -C target-feature=-sse,-sse2
    -C force-frame-pointers=yes
    -C link-arg=-nostartfiles
    -C link-arg=-nostdlib
    -C link-arg=-static
    -C link-arg=-no-pie
    -C "link-arg=-Wl,-T,$GUEST/link.ld"
    -C link-arg=-Wl,--build-id=none
    -C link-arg=-Wl,-n
    -C link-arg=-Wl,-z,noexecstack
)
# Flags for this build only, whatever RUSTFLAGS or cargo configs say.
CARGO_ENCODED_RUSTFLAGS=$(IFS=$'\x1f'; echo "${flags[*]}")
export CARGO_ENCODED_RUSTFLAGS
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_TARGET_DIR CARGO_BUILD_TARGET

# Drops rustc's (expected, explained above) warning about -sse2 from cargo's stderr.
quiet_sse2_warning() {
    awk '
        /^warning: target feature `sse2` must be enabled/ { skip = 1; next }
        skip && /^ *$/ { skip = 0; next }
        skip { next }
        /^warning: `guest` \(bin "guest"\) generated 1 warning$/ { next }
        { print }
    '
}

cd "$GUEST"
cargo_args=(--release --quiet --target "$TARGET" --target-dir "$BUILD_DIR")
if [ "${1:-}" = clippy ]; then
    shift
    { cargo clippy "${cargo_args[@]}" "$@" -- -D warnings 2>&1 1>&3 | quiet_sse2_warning >&2; } 3>&1
    exit 0
fi
{ cargo build "${cargo_args[@]}" "$@" 2>&1 1>&3 | quiet_sse2_warning >&2; } 3>&1

ELF="$BUILD_DIR/$TARGET/release/guest"
# Guard against instructions the emulated ring-0 code cannot have (see above and
# guest/src/sys.rs): SSE/AVX registers, fences, cmpxchg16b, xsave/xrstor. (int3 is
# left out: the linker pads between functions with it.)
if command -v objdump >/dev/null; then
    bad=$(objdump -d --no-show-raw-insn "$ELF" |
        grep -E '%[xyz]mm|\b[lms]fence\b|cmpxchg16b|\bxsave|\bxrstor' || true)
    if [ -n "$bad" ]; then
        echo "test guest: instructions the emulated ring 0 cannot run:" >&2
        echo "$bad" | head -20 >&2
        exit 1
    fi
fi

mkdir -p "$OUT_DIR"
# Replace the ELF atomically: tests may be reading it.
tmp="$OUT_DIR/.guest.elf.$$"
cp "$ELF" "$tmp"
mv -f "$tmp" "$OUT_DIR/guest.elf"
echo "test guest: $OUT_DIR/guest.elf" >&2
