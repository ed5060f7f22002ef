"""The decoded-chunk buffer pool: memory is reused only once nothing can read it."""

from zipfs.read._slots import Pool

SLOT = 1 << 16


def test_a_slot_returns_to_the_pool_only_when_its_last_view_goes() -> None:
    pool = Pool(SLOT, 4)
    slot = pool.take(SLOT)
    view = memoryview(slot)
    view[:4] = b"keep"
    part = view[:4]
    del slot, view
    assert pool.in_use == 1  # the slice still holds it
    others = [pool.take(SLOT) for _ in range(3)]
    for o in others:
        memoryview(o)[:4] = b"XXXX"
    assert pool.take(SLOT) is None  # exhausted: the held slot is not handed out again
    assert bytes(part) == b"keep"
    del part
    assert pool.in_use == 3
    again = pool.take(100)
    assert again is not None and len(again) == 100 and pool.in_use == 4


def test_sizes_beyond_a_slot_and_an_empty_pool_give_none() -> None:
    assert Pool(SLOT, 4).take(SLOT + 1) is None
    assert Pool(SLOT, 0).take(1) is None


def test_slabs_are_mapped_on_demand() -> None:
    pool = Pool(SLOT, 1000)
    assert pool.mapped == 0
    held = [pool.take(SLOT) for _ in range(600)]
    assert all(h is not None for h in held)
    assert pool.mapped == 2 * (32 << 20)  # 512 slots of 64 KiB per 32 MiB slab
    del held
    assert pool.in_use == 0
