"""A byte-bounded LRU of decoded chunks, shared by threads."""

from __future__ import annotations

import threading
from collections import OrderedDict


class ChunkCache:
    """Holds decoded chunks up to `capacity` bytes; least recently used go first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.hits = 0
        self.misses = 0
        #: key -> (value, bytes of memory it holds)
        self._data: OrderedDict[int, tuple[bytes | memoryview, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> bytes | memoryview | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: int, value: bytes | memoryview, cost: int | None = None) -> None:
        """Cache value; `cost` is the memory it holds when more than its length (a pooled slot)."""
        cost = len(value) if cost is None else cost
        if cost > self.capacity:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.size -= old[1]
            self._data[key] = (value, cost)
            self.size += cost
            while self.size > self.capacity:
                _, (_, evicted) = self._data.popitem(last=False)
                self.size -= evicted

    def __contains__(self, key: int) -> bool:
        """Whether key is cached, without counting a hit or refreshing it."""
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
