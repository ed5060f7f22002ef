"""A byte-bounded cache of decoded chunks, shared by threads."""

from __future__ import annotations

import threading
from collections import OrderedDict

Item = tuple[bytes | memoryview, int]  # a value and the bytes of memory it holds


class ChunkCache:
    """Holds decoded chunks up to `capacity` bytes, in two LRU lists as in 2Q.

    Chunks the read path is done with (a base chunk once its delta is decoded, a chunk whose
    every byte the mount has handed to the kernel, whose page cache holds them now, chunks
    behind a whole-file pass) sit on the cold list, which is evicted first and which `reclaim`
    empties so that their memory is reused before more is mapped. A cold chunk that is asked
    for again moves to the hot list.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._hot: OrderedDict[int, Item] = OrderedDict()
        self._cold: OrderedDict[int, Item] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> bytes | memoryview | None:
        with self._lock:
            item = self._hot.get(key)
            if item is not None:
                self._hot.move_to_end(key)
            else:
                item = self._cold.pop(key, None)
                if item is None:
                    self.misses += 1
                    return None
                self._hot[key] = item
            self.hits += 1
            return item[0]

    def put(self, key: int, value: bytes | memoryview, cost: int | None = None, cold: bool = False) -> None:
        """Cache value; `cost` is the memory it holds when more than its length (a pooled slot)."""
        cost = len(value) if cost is None else cost
        if cost > self.capacity:
            return
        with self._lock:
            self._drop(key)
            (self._cold if cold else self._hot)[key] = (value, cost)
            self.size += cost
            while self.size > self.capacity:  # cold first, but never the chunk just put
                from_cold = self._cold and (next(iter(self._cold)) != key or not self._hot)
                self.size -= (self._cold if from_cold else self._hot).popitem(last=False)[1][1]

    def demote(self, key: int) -> None:
        """The read path is done with key for now: make it the first to go."""
        with self._lock:
            item = self._hot.pop(key, None)
            if item is not None:
                self._cold[key] = item

    def reclaim(self, nbytes: int) -> int:
        """Evict cold chunks, oldest first, until nbytes are freed; the bytes freed."""
        freed = 0
        with self._lock:
            while freed < nbytes and self._cold:
                freed += self._cold.popitem(last=False)[1][1]
            self.size -= freed
        return freed

    def _drop(self, key: int) -> None:
        old = self._hot.pop(key, None) or self._cold.pop(key, None)
        if old is not None:
            self.size -= old[1]

    def __contains__(self, key: int) -> bool:
        """Whether key is cached, without counting a hit or refreshing it."""
        return key in self._hot or key in self._cold

    def __len__(self) -> int:
        return len(self._hot) + len(self._cold)
