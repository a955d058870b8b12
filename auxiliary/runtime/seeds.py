"""Seeds that depend only on their parts: stable across processes, restarts and Python's hash salt.

The one recipe: sha256 of the parts' str() joined by \\x1f. `derive_seed` is a 31-bit seed for torch and
the samplers, `seeded_rng` a random.Random for draws in Python."""
from __future__ import annotations

import hashlib
import random


def _digest(parts) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()


def derive_seed(*parts) -> int:
    """A non-negative 31-bit seed from `parts`."""
    return int.from_bytes(_digest(parts)[:4], "big") & 0x7FFFFFFF


def seeded_rng(*parts) -> random.Random:
    """A random.Random seeded by `parts` alone."""
    return random.Random(int.from_bytes(_digest(parts)[:8], "big"))
