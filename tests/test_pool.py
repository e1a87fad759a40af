"""The server's pool of idle drafters: reuse by spec, bounded in bytes and in count."""

from decodekit.drafters import TargetInfo, make_drafter
from decodekit.pool import MAX_IDLE, DrafterPool


class Sized:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def memory_bytes(self) -> int:
        return self.nbytes


def test_takes_the_most_recent_drafter_of_a_spec():
    pool = DrafterPool(max_bytes=100)
    first, second, other = Sized(10), Sized(10), Sized(10)
    pool.give("a", first)
    pool.give("b", other)
    pool.give("a", second)
    assert pool.take("a") is second and pool.take("a") is first and pool.take("a") is None
    assert pool.take("b") is other and len(pool) == 0 and pool.nbytes == 0


def test_drops_the_oldest_past_the_byte_bound():
    pool = DrafterPool(max_bytes=100)
    old, mid, new = Sized(40), Sized(40), Sized(40)
    for spec, drafter in (("a", old), ("b", mid), ("c", new)):
        pool.give(spec, drafter)
    assert pool.nbytes == 80 and pool.take("a") is None and pool.take("b") is mid
    pool.give("huge", Sized(101))  # larger than the bound: never kept
    assert pool.take("huge") is None and pool.nbytes <= 100


def test_bounds_the_count_of_empty_drafters():
    pool = DrafterPool(max_bytes=1 << 30)
    for i in range(MAX_IDLE + 10):
        pool.give(f"spec{i}", Sized(0))
    assert len(pool) == MAX_IDLE and pool.take("spec0") is None and pool.take(f"spec{MAX_IDLE + 9}") is not None


def test_real_drafters_report_their_size_to_the_pool():
    pool = DrafterPool(max_bytes=49152 * 4 * 95)  # room for k=40 and k=50 together, not for k=30 beside them
    for k in range(1, 6):
        pool.give(f"recycling:k={k * 10}", make_drafter(f"recycling:k={k * 10}", TargetInfo(49152)))
    assert pool.nbytes == 49152 * 4 * (40 + 50) and len(pool) == 2  # k=10, 20, 30 dropped in turn
