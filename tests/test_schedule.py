"""The launch schedule (nag_schedule.h) as the kernels see it, via the test-only op nag_cuda::_plan.

Each row is one block: (launch, block, tensor, begin, end). Checked against what a schedule must be: every element
of every tensor updated by exactly one block, blocks numbered 0..n-1 in each launch, no launch over its limits.
"""

import pytest
import torch

import nag_cuda  # noqa: F401  (registers torch.ops.nag_cuda)

CHUNK = 16384
MAX_SEGMENTS = 640
MAX_BLOCKS = 2**31 - 1


def plan(numels, max_segments=MAX_SEGMENTS, max_blocks=MAX_BLOCKS):
    return torch.ops.nag_cuda._plan(numels, max_segments, max_blocks).tolist()


def check_schedule(numels, rows, max_segments, max_blocks):
    covered = {t: [] for t in range(len(numels))}
    launches = {}
    for launch, block, tensor, begin, end in rows:
        assert 0 <= begin < end <= numels[tensor]
        assert end - begin <= CHUNK
        covered[tensor].append((begin, end))
        launches.setdefault(launch, []).append((block, tensor))
    for t, n in enumerate(numels):
        spans = sorted(covered[t])
        assert sum(e - b for b, e in spans) == n, f"tensor {t}"
        assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)), f"tensor {t} has a gap"
    assert sorted(launches) == list(range(len(launches)))
    for blocks in launches.values():
        assert [b for b, _ in blocks] == list(range(len(blocks)))
        assert len(blocks) <= max_blocks
        segments = sum(1 for i, (_, t) in enumerate(blocks) if i == 0 or blocks[i - 1][1] != t)
        assert segments <= max_segments


@pytest.mark.parametrize(
    "numels, max_segments, max_blocks",
    [
        ([5, 0, 40000, 3], MAX_SEGMENTS, MAX_BLOCKS),
        ([0], MAX_SEGMENTS, MAX_BLOCKS),
        ([], MAX_SEGMENTS, MAX_BLOCKS),
        ([7, 3, 0], MAX_SEGMENTS, MAX_BLOCKS),  # an empty tensor last
        ([1] * 2001, MAX_SEGMENTS, MAX_BLOCKS),  # more tensors than one launch holds
        ([100, 5 * CHUNK + 1, 9], 2, 3),  # a tensor larger than one launch's blocks
        ([CHUNK, CHUNK - 1, CHUNK + 1, 1], 3, 2),
        ([3 * CHUNK] * 5, 1, 1),  # one block per launch
    ],
)
def test_schedule_covers_each_element_once(numels, max_segments, max_blocks):
    check_schedule(numels, plan(numels, max_segments, max_blocks), max_segments, max_blocks)


def test_schedule_random():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        numels = [int(v) for v in torch.randint(0, 4 * CHUNK, (n,), generator=gen)]
        max_segments = int(torch.randint(1, 8, (1,), generator=gen))
        max_blocks = int(torch.randint(1, 12, (1,), generator=gen))
        check_schedule(numels, plan(numels, max_segments, max_blocks), max_segments, max_blocks)


def test_one_launch_for_a_model_sized_group():
    # 161 tensors (ResNet-50 has 161 parameters): one launch, one block per 16384-element chunk
    numels = [64 * 3 * 7 * 7] + [256 * 1024] * 80 + [1000] * 80
    rows = plan(numels)
    assert {r[0] for r in rows} == {0}
    assert len(rows) == sum(-(-n // CHUNK) for n in numels)


def test_split_keeps_chunk_alignment():
    # A tensor split across launches restarts at a chunk boundary, so 16-byte alignment is kept.
    rows = plan([10 * CHUNK + 3], 1, 3)
    assert all(begin % CHUNK == 0 for _, _, _, begin, _ in rows)
    assert len({r[0] for r in rows}) == 4


def test_plan_rejects_bad_limits():
    with pytest.raises(RuntimeError, match="max_segments"):
        plan([1], 0, 1)
    with pytest.raises(RuntimeError, match="max_blocks"):
        plan([1], 1, 0)
    with pytest.raises(RuntimeError, match="numels"):
        plan([-1])
