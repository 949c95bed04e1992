"""Reads the exported function names of an ELF shared library without loading it.

Loading is not an option for ABI detection: the library may be for another machine (an aarch64
librkllmrt.so inspected on an x86_64 host), and calling into a library through the wrong struct set is
exactly what detection exists to prevent. Only ELF64 and ELF32, either endianness, are read.
"""

from __future__ import annotations

import struct
from pathlib import Path

from rkedge.errors import InputError

_SHT_DYNSYM = 11
_STT_FUNC = 2
_SHN_UNDEF = 0


def elf_machine(path: str | Path) -> str:
    """The ``e_machine`` of an ELF file as a name (``x86_64``, ``aarch64``, ``arm``...)."""
    data = Path(path).read_bytes()[:64]
    _check_magic(data, path)
    endian = "<" if data[5] == 1 else ">"
    (machine,) = struct.unpack_from(endian + "H", data, 18)
    return {62: "x86_64", 183: "aarch64", 40: "arm", 3: "i386", 243: "riscv"}.get(machine, f"machine-{machine}")


def exported_functions(path: str | Path) -> set[str]:
    """Names of the functions a shared library defines in its dynamic symbol table."""
    data = Path(path).read_bytes()
    _check_magic(data, path)
    is64 = data[4] == 2
    endian = "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(endian + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x3A)
        section = struct.Struct(endian + "IIQQQQIIQQ")
        symbol = struct.Struct(endian + "IBBHQQ")
    else:
        shoff, = struct.unpack_from(endian + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x2E)
        section = struct.Struct(endian + "IIIIIIIIII")
        symbol = struct.Struct(endian + "IIIBBH")
    sections = [section.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    names: set[str] = set()
    for sh in sections:
        if sh[1] != _SHT_DYNSYM:
            continue
        offset, size, link, entsize = (sh[4], sh[5], sh[6], sh[9]) if is64 else (sh[4], sh[5], sh[6], sh[9])
        strtab = sections[link]
        str_offset = strtab[4]
        for i in range(size // entsize):
            fields = symbol.unpack_from(data, offset + i * entsize)
            if is64:
                name_off, info, _other, shndx, _value, _size = fields
            else:
                name_off, _value, _size, info, _other, shndx = fields
            if shndx == _SHN_UNDEF or (info & 0xF) != _STT_FUNC:
                continue
            end = data.index(b"\0", str_offset + name_off)
            names.add(data[str_offset + name_off:end].decode("ascii", "replace"))
    return names


def _check_magic(data: bytes, path: str | Path) -> None:
    if data[:4] != b"\x7fELF":
        raise InputError(f"{path} is not an ELF shared library.", fix="point --lib at librkllmrt.so")
