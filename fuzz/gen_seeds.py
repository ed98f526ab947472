#!/usr/bin/env python3
"""Writes the seeds of the fuzz targets whose inputs are easiest made here, into
fuzz/seeds/TARGET/ (deterministic; overwrites its files, leaves others):

- kernel_files: small bzImages with the setup header of the Linux boot protocol (offsets
  from the kernel's Documentation/arch/x86/boot.rst), one per path through Ferry's
  bzImage checks, and the ELF seeds of kernel_images for the PVH path;
- memory_files: RAM files and the peer's (gpa, size, file_offset) entries, accepted and
  refused;
- unix_fds: byte streams split into messages carrying descriptors.

    python3 fuzz/gen_seeds.py
"""
import os
import shutil
import struct
import sys


def bzimage(setup_sects=4, version=0x020F, loadflags=0x01, xloadflags=0x03,
            relocatable=1, pref_address=0x100_0000, kernel_alignment=0x20_0000,
            init_size=0x80_0000, payload=b"\x90" * 512, cmdline_size=2047,
            declared_sects=None):
    sects = 4 if setup_sects == 0 else setup_sects
    img = bytearray((sects + 1) * 512)
    hdr = {
        0x1F1: ("B", setup_sects if declared_sects is None else declared_sects),
        0x1FE: ("H", 0xAA55),          # boot_flag
        0x202: ("I", 0x53726448),      # "HdrS"
        0x206: ("H", version),
        0x211: ("B", loadflags),       # LOADED_HIGH
        0x214: ("I", 0x10_0000),       # code32_start
        0x22C: ("I", 0x7FFF_FFFF),     # initrd_addr_max
        0x230: ("I", kernel_alignment),
        0x234: ("B", relocatable),
        0x236: ("H", xloadflags),      # XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
        0x238: ("I", cmdline_size),
        0x258: ("Q", pref_address),
        0x260: ("I", init_size),
    }
    for off, (fmt, val) in hdr.items():
        struct.pack_into("<" + fmt, img, off, val)
    return bytes(img) + payload


KERNEL_SEEDS = {
    "bz_ok": bzimage(),
    "bz_setup_sects_0": bzimage(setup_sects=0),
    "bz_fixed_address": bzimage(relocatable=0, pref_address=0x200_0000),
    "bz_protocol_2_10": bzimage(version=0x020A),
    "bz_no_64bit_entry": bzimage(xloadflags=0),
    "bz_init_size_too_big": bzimage(init_size=0x4000_0000),
    "bz_short_cmdline": bzimage(cmdline_size=8),
    "bz_truncated_setup": bzimage(declared_sects=60, payload=b""),
}


MIB = 1 << 20


def ram(*files):
    """files: (file length, gpa, size, file_offset) per file."""
    out = bytes([len(files) - 1])
    for length, gpa, size, offset in files:
        out += struct.pack("<IQQQ", length, gpa, size, offset)
    return out


MEMORY_SEEDS = {
    "one_file": ram((MIB, 0, MIB, 0)),
    "two_files": ram((MIB, 0, MIB, 0), (0x2000, 1 << 32, 0x2000, 0)),
    "one_file_two_ranges": ram((2 * MIB, 0, MIB, 0), (2 * MIB, 1 << 32, MIB, MIB)),
    "past_the_end": ram((MIB, 0, MIB, 0x1000)),
    "offset_overflows": ram((MIB, 0, 0x1000, (1 << 64) - 0x800)),
    "overlapping": ram((MIB, 0, MIB, 0), (MIB, 0x8_0000, MIB, 0)),
    "unaligned": ram((MIB, 0x800, 0x1000, 0x10)),
    "empty_range": ram((MIB, 0, 0, 0)),
    "gpa_wraps": ram((MIB, (1 << 64) - 0x1000, 0x2000, 0)),
}


def messages(flags, *msgs):
    """msgs: (data, descriptor count)."""
    out = bytes([flags])
    for data, count in msgs:
        out += bytes([len(data), count]) + data
    return out


UNIX_SEEDS = {
    "plain": messages(0x20, (b"hello", 0), (b"world", 0)),
    "one_fd": messages(0x20, (b"memory-fds", 1)),
    "many_fds": messages(0x40, (b"a" * 200, 253), (b"b", 2)),
    "with_credentials": messages(0x21, (b"x" * 16, 3), (b"y" * 40, 0), (b"z", 7)),
    "byte_reads": messages(0x02, (b"abc", 2), (b"def", 2)),
}


def write_all(out, seeds):
    os.makedirs(out, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        print(f"{len(data):>8} bytes  {out}/{name}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    seeds = os.path.join(here, "seeds")
    write_all(os.path.join(seeds, "kernel_files"), KERNEL_SEEDS)
    for name in sorted(os.listdir(os.path.join(seeds, "kernel_images"))):
        shutil.copy(os.path.join(seeds, "kernel_images", name),
                    os.path.join(seeds, "kernel_files", name))
        print(f"  (copy)  {seeds}/kernel_files/{name}")
    write_all(os.path.join(seeds, "memory_files"), MEMORY_SEEDS)
    write_all(os.path.join(seeds, "unix_fds"), UNIX_SEEDS)


if __name__ == "__main__":
    main()
