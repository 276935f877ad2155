import resource

import pytest
import torch

from n2l.memory import _glibc, retain_freed_memory


def _page_faults() -> int:
    """Minor page faults of 10 rounds of allocating, touching and freeing 5 x 8 MiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        blocks = [torch.empty(2 * 1024 * 1024).fill_(1.0) for _ in range(5)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_freed_memory_is_reused_inside():
    # Outside, glibc gives the blocks back and each round faults them in again (4 KiB pages:
    # about 100k faults; fewer where transparent huge pages back them).
    pages = 10 * 5 * 8 * 1024 * 1024 // 4096
    outside = _page_faults()
    with retain_freed_memory():
        _page_faults()  # the first round may fault the heap in
        inside = _page_faults()
    assert inside < pages // 10
    assert inside <= outside
