"""Light functions for ``run_in_child`` tests (a spawned child imports this module, so it stays cheap to import)."""

from __future__ import annotations


def allocate_mib(mib: int) -> int:
    """Touch ``mib`` MiB of memory and return the number of bytes touched."""
    if mib < 0:
        raise ValueError(f"expected mib >= 0, got {mib}")
    block = bytearray(mib * 1024 * 1024)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # write one byte per page so every page is resident
    return len(block)
