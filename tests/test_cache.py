"""The decoded-chunk cache: byte bound, LRU order, and the cold list served chunks go to."""

from zipfs.read.cache import ChunkCache


def test_lru_within_the_byte_bound() -> None:
    c = ChunkCache(30)
    for k in range(3):
        c.put(k, bytes(10))
    assert c.get(0) is not None  # 0 is now the most recent
    c.put(3, bytes(10))
    assert 1 not in c and {0, 2, 3} <= {k for k in range(4) if k in c}
    assert c.size == 30


def test_cold_chunks_go_first_and_come_back_when_asked_for() -> None:
    c = ChunkCache(30)
    for k in range(3):
        c.put(k, bytes(10))
    c.demote(2)
    c.put(3, bytes(10))
    assert 2 not in c and 0 in c  # the cold chunk went, not the least recently used hot one
    c.put(4, bytes(10), cold=True)
    assert c.get(4) is not None  # asked for again: hot
    c.put(5, bytes(10))
    assert 4 in c and 0 not in c


def test_reclaim_takes_only_cold_chunks_and_counts_what_they_held() -> None:
    c = ChunkCache(100)
    c.put(1, bytes(10), cost=40)
    c.put(2, bytes(10), cold=True, cost=40)
    c.put(3, bytes(10))
    assert c.reclaim(1) == 40 and 2 not in c
    assert c.reclaim(100) == 0 and len(c) == 2 and c.size == 50
