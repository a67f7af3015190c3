"""The ring's work per device, counted from the kernel's block plan, against a count by hand
(the ring itself runs on 8 devices in tests/parallel)."""

import numpy as np
import pytest

from jaxattn.functional import ring_work_per_device, zigzag_order


@pytest.mark.parametrize("zigzag", [False, True])
def test_work_per_device_counts_the_visible_sub_block_pairs(zigzag):
    T, n, block = 64, 4, 4
    order = np.asarray(zigzag_order(T, n)) if zigzag else np.arange(T)
    chunk = T // n
    expected = []
    for device in range(n):
        queries = order[device * chunk : (device + 1) * chunk].reshape(-1, block)  # sub-blocks of positions
        keys = order.reshape(-1, block)
        expected.append(sum(int(q.max() >= k.min()) for q in queries for k in keys))  # some key at or before some query
    assert ring_work_per_device(T, n, block=block, zigzag=zigzag) == expected
    assert ring_work_per_device(T, n, block=block, zigzag=zigzag, causal=False) == [(T // block) * (chunk // block)] * n


def test_a_split_into_partial_blocks_is_refused():
    with pytest.raises(ValueError, match="whole sub-blocks"):
        ring_work_per_device(60, 4, block=4, zigzag=False)
