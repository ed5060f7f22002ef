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
        self._data: OrderedDict[int, bytes | memoryview] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> bytes | memoryview | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: int, value: bytes | memoryview) -> None:
        if len(value) > self.capacity:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self._data[key] = value
            self.size += len(value)
            while self.size > self.capacity:
                _, evicted = self._data.popitem(last=False)
                self.size -= len(evicted)

    def __contains__(self, key: int) -> bool:
        """Whether key is cached, without counting a hit or refreshing it."""
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
