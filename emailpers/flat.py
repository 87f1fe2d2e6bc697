"""Run-long bookkeeping whose memory does not grow with the recipient count.

- `Histogram`: request latencies in fixed logarithmic buckets; the report's
  percentiles come from it within `Histogram.ERROR` (relative), the maximum exactly.
- `FirstSeen`: what was first stored under a key (duplicate ids, an address
  reused under another id). In memory up to `spill_at` keys, then in an SQLite
  file in a private temporary folder with a bounded page cache: exact (the
  keys themselves, not digests, so no false duplicate), and flat in memory at
  any N. SQLite because it is in the standard library, an indexed table on
  disk is what the job needs, and it answers a lookup in a few microseconds.
- `Recent`: the most recently used values by key, within a count and a byte
  budget (answers shared by many recipients, decoded cache entries).
- `Sketch`: which keys were added, in a fixed 1 MiB bit set (a Bloom filter):
  never a false "no", a false "yes" for a share of keys that grows with the count.
"""

from __future__ import annotations

import math
import shutil
import sqlite3
import tempfile
import weakref
from array import array
from collections import OrderedDict
from pathlib import Path
from typing import Generic, TypeVar

V = TypeVar("V")


class Sketch:
    """Keys added, as 3 bits each in a fixed 2**23-bit set: `key in sketch` is
    never False for a key added, and True for a key never added about 2.7% of the
    time at a million keys (0.03% at 100,000); memory is 1 MiB at any count.
    Python's hash() of the key, so only for keys of this process's life."""

    BITS = 1 << 23
    _MASK = BITS - 1

    def __init__(self) -> None:
        self._bits = bytearray(self.BITS // 8)

    def _positions(self, key: str) -> tuple[int, int, int]:
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        first, step = h & self._MASK, (h >> 32) | 1  # double hashing (Kirsch-Mitzenmacher)
        return first, (first + step) & self._MASK, (first + 2 * step) & self._MASK

    def add(self, key: str) -> None:
        for bit in self._positions(key):
            self._bits[bit >> 3] |= 1 << (bit & 7)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and all(self._bits[bit >> 3] >> (bit & 7) & 1 for bit in self._positions(key))


class Recent(Generic[V]):
    """Values by key, the least recently used dropped first once there are
    more than `entries` or their sizes (as the caller counts them) pass `size`."""

    def __init__(self, entries: int, size: int) -> None:
        self.entries, self.size = entries, size
        self.used = 0
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: V, size: int) -> None:
        self.pop(key)
        if size > self.size:
            return  # would push out everything else and still not fit
        self._items[key] = (value, size)
        self.used += size
        while len(self._items) > self.entries or self.used > self.size:
            self.used -= self._items.popitem(last=False)[1][1]

    def pop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.used -= item[1]

    def clear(self) -> None:
        self._items.clear()
        self.used = 0


class Histogram:
    """Counts of values (ms) in buckets growing by `RATIO` from `LOWEST`; a
    percentile is its bucket's geometric middle, so within ERROR of the true
    nearest-rank value, and never outside the smallest..largest value. The
    first `EXACT` values are also kept, and percentiles are exact while no
    more came. 1,200 buckets and 1,024 values: ~18 KB whatever the count."""

    LOWEST = 0.01  # ms
    RATIO = 1.02
    BUCKETS = 1200  # up to 0.01 * 1.02**1200 ms, ~2.1e8 ms: more than any timeout
    ERROR = math.sqrt(RATIO) - 1  # ~1%
    EXACT = 1024

    def __init__(self) -> None:
        self.counts = array("q", bytes(8 * self.BUCKETS))
        self.count = 0
        self.max: float | None = None
        self.min: float | None = None
        self.exact: array[float] | None = array("d")
        self._log_ratio = math.log(self.RATIO)

    def add(self, ms: float) -> None:
        index = int(math.log(ms / self.LOWEST) / self._log_ratio) if ms > self.LOWEST else 0
        self.counts[min(index, self.BUCKETS - 1)] += 1
        if self.exact is not None:
            self.exact.append(ms)
            if len(self.exact) > self.EXACT:
                self.exact = None
        self.count += 1
        self.max = ms if self.max is None or ms > self.max else self.max
        self.min = ms if self.min is None or ms < self.min else self.min

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile, within ERROR (and never outside min..max); None for no values."""
        if not self.count:
            return None
        assert self.min is not None and self.max is not None
        rank = max(1, math.ceil(q / 100 * self.count))
        if self.exact is not None:
            return float(sorted(self.exact)[rank - 1])
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                middle = float(self.LOWEST * self.RATIO ** (index + 0.5))
                return min(max(middle, self.min), self.max)
        return self.max

    def __len__(self) -> int:
        return self.count

    def copy(self) -> Histogram:
        other = Histogram()
        other.counts = array("q", self.counts)
        other.count, other.max, other.min = self.count, self.max, self.min
        other.exact = None if self.exact is None else array("d", self.exact)
        return other

    @classmethod
    def of(cls, values: list[float] | tuple[float, ...]) -> Histogram:
        histogram = cls()
        for value in values:
            histogram.add(value)
        return histogram


class FirstSeen:
    """`first(key, value)`: None the first time `key` comes, storing `value`;
    after that, the value stored then. The spill file goes with `close()`,
    or when the object is collected, or at exit, whichever comes first."""

    SPILL_AT = 100_000  # keys held in a dict (~10 MB) before they move to disk
    CACHE_KIB = 2 * 1024  # SQLite's page cache once spilled (the kernel caches the file too)

    def __init__(self, spill_at: int | None = None) -> None:
        self.spill_at = self.SPILL_AT if spill_at is None else spill_at
        self._memory: dict[str, str] | None = {}
        self._db: sqlite3.Connection | None = None
        self._cleanup: weakref.finalize[[sqlite3.Connection, str], FirstSeen] | None = None

    def first(self, key: str, value: str = "") -> str | None:
        if self._memory is not None:
            before = self._memory.get(key)
            if before is None:
                self._memory[key] = value
                if len(self._memory) > self.spill_at:
                    self._spill()
            return before
        assert self._db is not None
        cursor = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (key, value))
        if cursor.rowcount:
            return None
        row = self._db.execute("SELECT value FROM seen WHERE key = ?", (key,)).fetchone()
        return str(row[0])

    def __contains__(self, key: object) -> bool:
        if self._memory is not None:
            return key in self._memory
        assert self._db is not None
        return self._db.execute("SELECT 1 FROM seen WHERE key = ?", (key,)).fetchone() is not None

    def _spill(self) -> None:
        folder = tempfile.mkdtemp(prefix="emailpers-seen-")
        db = sqlite3.connect(Path(folder) / "seen.sqlite", isolation_level=None)
        self._cleanup = weakref.finalize(self, _remove, db, folder)
        for pragma in ("journal_mode = OFF", "synchronous = OFF", f"cache_size = -{self.CACHE_KIB}",
                       "temp_store = FILE", "locking_mode = EXCLUSIVE"):
            db.execute(f"PRAGMA {pragma}")
        db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
        assert self._memory is not None
        db.execute("BEGIN")
        db.executemany("INSERT INTO seen VALUES (?, ?)", self._memory.items())
        self._memory = None
        self._db = db

    @property
    def spilled(self) -> bool:
        return self._db is not None

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
        self._db = None
        self._memory = {}

    def __enter__(self) -> FirstSeen:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _remove(db: sqlite3.Connection, folder: str) -> None:
    db.close()
    shutil.rmtree(folder, ignore_errors=True)
