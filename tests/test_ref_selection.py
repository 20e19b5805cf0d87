"""The GBSA plan reference: budget, scores, local blocks, ragged rows."""

import pytest
import torch

from resa.ref import (block_budget, block_scores_ref, block_summaries_ref, group_query, score_blocks_ref,
                      select_blocks_ref)


@pytest.mark.parametrize(
    "nb,ratio,min_blocks,expected",
    [(0, 0.1, 16, 0), (1, 0.1, 16, 1), (15, 0.1, 16, 15), (16, 0.1, 16, 16), (17, 0.1, 16, 16),
     (70, 0.1, 1, 7), (71, 0.1, 1, 8), (300, 0.1, 16, 30), (300, 0.05, 16, 16), (10, 1.0, 1, 10),
     (10, 3.0, 1, 10)],
    ids=lambda x: str(x),
)
def test_block_budget(nb, ratio, min_blocks, expected):
    assert block_budget(nb, ratio, min_blocks) == expected


B, HKV, G, N, D, BS = 2, 3, 4, 64, 16, 8  # full blocks only: the summaries bound whole blocks


def _full_blocks(seed):
    """Queries, keys and their block summaries (every row N tokens long)."""
    torch.manual_seed(seed)
    q = torch.randn(B, HKV * G, D)
    k = torch.randn(B, HKV, N, D)
    kmin, kmax = block_summaries_ref(k, torch.tensor([N] * B), BS)
    return q, k, kmin, kmax


def test_scores_bound_every_key_in_block():
    q, k, kmin, kmax = _full_blocks(0)
    qg = group_query(q, HKV)
    s = score_blocks_ref(qg, kmin, kmax)
    exact = torch.einsum("bhd,bhnd->bhn", qg, k).view(B, HKV, N // BS, BS).amax(-1)
    assert (s >= exact - 1e-5).all()
    assert torch.equal(qg, q.view(B, HKV, G, D).mean(2))


def test_max_pool_bounds_every_head_and_is_the_largest_head_bound():
    q, k, kmin, kmax = _full_blocks(1)
    s = block_scores_ref(q, kmin, kmax, "max")
    heads = q.view(B, HKV, G, D)
    exact = torch.einsum("bhgd,bhnd->bhgn", heads, k).view(B, HKV, G, N // BS, BS).amax(-1)  # per head, per block
    assert (s >= exact.amax(2) - 1e-5).all()
    per_head = [score_blocks_ref(heads[:, :, g], kmin, kmax) for g in range(G)]
    torch.testing.assert_close(s, torch.stack(per_head).amax(0))
    assert not torch.allclose(s, block_scores_ref(q, kmin, kmax, "mean"))
    with pytest.raises(ValueError, match="group_pool"):
        block_scores_ref(q, kmin, kmax, "median")


def _random_case(lengths, HKV=2, G=3, D=8, BS=4, nmax=None, seed=0):
    torch.manual_seed(seed)
    B = len(lengths)
    nmax = nmax or max(lengths)
    q = torch.randn(B, HKV * G, D)
    k = torch.randn(B, HKV, nmax, D)
    L = torch.tensor(lengths)
    for b, n in enumerate(lengths):
        k[b, :, n:] = float("nan")
    kmin, kmax = block_summaries_ref(k, L, BS)
    return q, k, kmin, kmax, L


def test_local_block_always_selected_even_with_lowest_score():
    q, k, kmin, kmax, L = _random_case([37], BS=4)
    nb = 10
    qg = group_query(q, 2)
    # Make the last block's bound the worst of all blocks.
    kmin[0, :, nb - 1] = -100 * qg[0].sign()
    kmax[0, :, nb - 1] = -100 * qg[0].sign()
    table, n = select_blocks_ref(q, kmin, kmax, L, block_size=4, active_ratio=0.1, min_blocks=2)
    assert n.tolist() == [2]
    assert (table[0, :, :2] == nb - 1).any(dim=-1).all()


@pytest.mark.parametrize("local", [1, 2, 3])
def test_local_blocks_count(local):
    q, k, kmin, kmax, L = _random_case([200], BS=4)
    table, n = select_blocks_ref(q, kmin, kmax, L, block_size=4, active_ratio=0.1, min_blocks=4,
                                 local_blocks=local)
    nb = 50
    for h in range(2):
        chosen = set(table[0, h, : n[0]].tolist())
        assert set(range(nb - local, nb)) <= chosen


def test_ragged_rows_select_as_if_alone():
    lengths = [300, 17, 64, 1]
    q, k, kmin, kmax, L = _random_case(lengths, BS=4)
    kw = dict(block_size=4, active_ratio=0.1, min_blocks=3)
    table, n = select_blocks_ref(q, kmin, kmax, L, **kw)
    for b, length in enumerate(lengths):
        nb = -(-length // 4)
        t1, n1 = select_blocks_ref(q[b:b + 1], kmin[b:b + 1, :, :nb], kmax[b:b + 1, :, :nb], L[b:b + 1], **kw)
        assert n1.item() == n[b].item()
        assert torch.equal(table[b, :, : n[b]], t1[0, :, : n1[0]])
        assert (table[b, :, n[b]:] == -1).all()
        assert (table[b, :, : n[b]] < nb).all()  # never a block past the row's end
        assert (table[b, :, : n[b]] == nb - 1).any(dim=-1).all()  # its own local block


def test_table_is_sorted_unique_and_padded():
    q, k, kmin, kmax, L = _random_case([1000, 400], BS=16, seed=3)
    table, n = select_blocks_ref(q, kmin, kmax, L, block_size=16, active_ratio=0.2, min_blocks=2, num_slots=20)
    assert table.shape == (2, 2, 20)
    for b in range(2):
        for h in range(2):
            row = table[b, h, : n[b]]
            assert torch.equal(row, torch.sort(row).values) and len(set(row.tolist())) == len(row)


def test_num_slots_too_small_is_an_error():
    q, k, kmin, kmax, L = _random_case([1000], BS=16)
    with pytest.raises(ValueError, match="num_slots"):
        select_blocks_ref(q, kmin, kmax, L, block_size=16, active_ratio=0.5, min_blocks=2, num_slots=3)


def test_selection_is_topk_of_scores():
    q, k, kmin, kmax, L = _random_case([512], BS=16, seed=5)
    table, n = select_blocks_ref(q, kmin, kmax, L, block_size=16, active_ratio=0.25, min_blocks=1)
    s = score_blocks_ref(group_query(q, 2), kmin, kmax)[0]
    for h in range(2):
        chosen = table[0, h, : n[0]].tolist()
        others = [i for i in range(32) if i not in chosen]
        free = [i for i in chosen if i != 31]
        assert min(s[h, free]) >= max(s[h, others])


def test_budget_formula_on_tensors_equals_the_integer_one():
    """One budget formula: its tensor form (the torch top-n, no host sync) equals the int form."""
    from resa.ref.selection import block_budget

    nb = torch.arange(0, 3000)
    for ratio, mb in ((0.1, 16), (0.05, 4), (0.333, 1), (1.0, 16), (2.5, 3)):
        want = torch.tensor([block_budget(int(n), ratio, mb) for n in nb])
        assert torch.equal(block_budget(nb, ratio, mb), want)
