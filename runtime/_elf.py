"""Reads the exported function names of an ELF shared library without loading it.

Loading is not an option for ABI detection: the library may be for another machine (an aarch64
librkllmrt.so inspected on an x86_64 host), and calling into a library through the wrong struct set is
exactly what detection exists to prevent. Only ELF64 and ELF32, either endianness, are read.

Callers that also scan the file for other things (library.py looks for the version marker) pass the bytes
they already read, so a library is read from disk once. The dynamic symbol table is found through the section
headers, or, in a library whose section headers were stripped (``sstrip``, some vendor builds), through the
``PT_DYNAMIC`` segment the dynamic loader itself uses.
"""

from __future__ import annotations

import struct
from pathlib import Path

from rkedge.errors import InputError

_SHT_DYNSYM = 11
_STT_FUNC = 2
_SHN_UNDEF = 0
_PT_LOAD = 1
_PT_DYNAMIC = 2
_DT_NULL, _DT_HASH, _DT_STRTAB, _DT_SYMTAB, _DT_SYMENT = 0, 4, 5, 6, 11
_DT_GNU_HASH = 0x6FFFFEF5
_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 3: "i386", 243: "riscv"}

ElfSource = str | Path | bytes


def elf_machine(source: ElfSource) -> str:
    """The ``e_machine`` of an ELF file (a path, or its bytes) as a name (``x86_64``, ``aarch64``, ``arm``...)."""
    if isinstance(source, bytes):
        data, name = source[:64], "the file"
    else:
        with open(source, "rb") as handle:  # the header only: no need to read a whole library
            data, name = handle.read(64), str(source)
    _check_magic(data, name)
    endian = "<" if data[5] == 1 else ">"
    (machine,) = struct.unpack_from(endian + "H", data, 18)
    return _MACHINES.get(machine, f"machine-{machine}")


def exported_functions(source: ElfSource, name: str | None = None) -> set[str]:
    """Names of the functions a shared library (a path, or its bytes) defines in its dynamic symbol table.

    Raises:
        InputError: when the data is not an ELF file or its tables cannot be read.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    label = name or (str(source) if not isinstance(source, bytes) else "the file")
    _check_magic(data, label)
    try:
        elf = _Elf(data)
        return elf.section_dynsym() or elf.segment_dynsym()
    except (struct.error, IndexError, ValueError) as exc:
        raise InputError(f"{label} is not a readable ELF shared library ({exc}).",
                         fix="point --lib at an intact librkllmrt.so (the download may be truncated)") from exc


class _Elf:
    """The few ELF structures the dynamic symbol table is reached through."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.is64 = data[4] == 2
        self.endian = "<" if data[5] == 1 else ">"
        if self.is64:
            self.symbol = struct.Struct(self.endian + "IBBHQQ")
            self.word = struct.Struct(self.endian + "Q")
        else:
            self.symbol = struct.Struct(self.endian + "IIIBBH")
            self.word = struct.Struct(self.endian + "I")

    def _symbols(self, offset: int, count: int, entsize: int, strtab: int) -> set[str]:
        names: set[str] = set()
        data = self.data
        for i in range(count):
            fields = self.symbol.unpack_from(data, offset + i * entsize)
            if self.is64:
                name_off, info, _other, shndx, _value, _size = fields
            else:
                name_off, _value, _size, info, _other, shndx = fields
            if shndx == _SHN_UNDEF or (info & 0xF) != _STT_FUNC:
                continue
            end = data.index(b"\0", strtab + name_off)
            names.add(data[strtab + name_off:end].decode("ascii", "replace"))
        return names

    def section_dynsym(self) -> set[str]:
        """Through the section headers (empty when they are stripped)."""
        data, endian = self.data, self.endian
        if self.is64:
            (shoff,) = struct.unpack_from(endian + "Q", data, 0x28)
            shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x3A)
            section = struct.Struct(endian + "IIQQQQIIQQ")
        else:
            (shoff,) = struct.unpack_from(endian + "I", data, 0x20)
            shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x2E)
            section = struct.Struct(endian + "IIIIIIIIII")
        if not shoff or not shnum:
            return set()
        sections = [section.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
        names: set[str] = set()
        for sh in sections:
            if sh[1] != _SHT_DYNSYM:
                continue
            offset, size, link, entsize = sh[4], sh[5], sh[6], sh[9]
            names |= self._symbols(offset, size // entsize, entsize, sections[link][4])
        return names

    def segment_dynsym(self) -> set[str]:
        """Through ``PT_DYNAMIC``: DT_SYMTAB/DT_STRTAB addresses, mapped to file offsets by the PT_LOAD segments;
        the symbol count from DT_HASH's nchain, else from walking DT_GNU_HASH's chains."""
        data, endian = self.data, self.endian
        if self.is64:
            (phoff,) = struct.unpack_from(endian + "Q", data, 0x20)
            phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
            program = struct.Struct(endian + "IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
            dyn = struct.Struct(endian + "qQ")
        else:
            (phoff,) = struct.unpack_from(endian + "I", data, 0x1C)
            phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x2A)
            program = struct.Struct(endian + "IIIIIIII")  # type, offset, vaddr, paddr, filesz, memsz, flags, align
            dyn = struct.Struct(endian + "iI")
        loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
        dynamic: tuple[int, int] | None = None
        for i in range(phnum):
            ph = program.unpack_from(data, phoff + i * phentsize)
            p_type = ph[0]
            offset, vaddr, filesz = (ph[2], ph[3], ph[5]) if self.is64 else (ph[1], ph[2], ph[4])
            if p_type == _PT_LOAD:
                loads.append((vaddr, offset, filesz))
            elif p_type == _PT_DYNAMIC:
                dynamic = (offset, filesz)
        if dynamic is None:
            return set()

        def file_offset(address: int) -> int:
            for vaddr, offset, filesz in loads:
                if vaddr <= address < vaddr + filesz:
                    return address - vaddr + offset
            raise ValueError(f"address {address:#x} is outside every PT_LOAD segment")

        tags: dict[int, int] = {}
        for i in range(dynamic[1] // dyn.size):
            tag, value = dyn.unpack_from(data, dynamic[0] + i * dyn.size)
            if tag == _DT_NULL:
                break
            tags.setdefault(tag, value)
        if _DT_SYMTAB not in tags or _DT_STRTAB not in tags:
            return set()
        symtab, strtab = file_offset(tags[_DT_SYMTAB]), file_offset(tags[_DT_STRTAB])
        entsize = tags.get(_DT_SYMENT, self.symbol.size)
        if _DT_HASH in tags:
            (count,) = struct.unpack_from(endian + "I", data, file_offset(tags[_DT_HASH]) + 4)  # nchain
        elif _DT_GNU_HASH in tags:
            count = self._gnu_hash_count(file_offset(tags[_DT_GNU_HASH]))
        else:
            raise ValueError("PT_DYNAMIC has neither DT_HASH nor DT_GNU_HASH: the symbol count is unknown")
        return self._symbols(symtab, count, entsize, strtab)

    def _gnu_hash_count(self, offset: int) -> int:
        """The number of dynamic symbols: one past the highest index any DT_GNU_HASH chain reaches."""
        data, endian = self.data, self.endian
        nbuckets, symoffset, bloom_size, _shift = struct.unpack_from(endian + "IIII", data, offset)
        buckets_at = offset + 16 + bloom_size * self.word.size
        buckets = struct.unpack_from(endian + f"{nbuckets}I", data, buckets_at)
        last = int(max(buckets, default=0))
        if last < symoffset:
            return int(symoffset)
        chains_at = buckets_at + nbuckets * 4
        while True:  # the chain of the highest bucket ends at the table's last symbol (its low bit is set)
            (value,) = struct.unpack_from(endian + "I", data, chains_at + (last - symoffset) * 4)
            if value & 1:
                return last + 1
            last += 1


def _check_magic(data: bytes, name: str | Path) -> None:
    if data[:4] != b"\x7fELF":
        raise InputError(f"{name} is not an ELF shared library.", fix="point --lib at librkllmrt.so")
    if len(data) < 52:  # the ELF32 header; ELF64's is 64 and its tables are bounds-checked when read
        raise InputError(f"{name} is a truncated ELF file.", fix="download librkllmrt.so again")
