"""The selection-recall analysis: its selection rule, mass accounting and needle lookup."""

import pytest
import torch

from resa.eval import selection
from resa.ref.selection import block_budget, group_query, score_blocks_ref, select_blocks_ref


def _layer(seed=0, HKV=2, G=3, D=16, n_keys=200, bs=16):
    torch.manual_seed(seed)
    q = torch.randn(HKV * G, D)
    k = torch.randn(HKV, n_keys + 7, D)
    nb = -(-n_keys // bs)
    kmin = torch.stack([k[:, b * bs:min((b + 1) * bs, n_keys)].amin(1) for b in range(nb)], 1)
    kmax = torch.stack([k[:, b * bs:min((b + 1) * bs, n_keys)].amax(1) for b in range(nb)], 1)
    return q, k, kmin, kmax, n_keys


def test_keep_top_is_the_reference_selection_rule():
    q, k, kmin, kmax, n = _layer()
    nb = kmin.shape[1]
    budget = block_budget(nb, 0.25, 4)
    table, _ = select_blocks_ref(q[None], kmin[None], kmax[None], torch.tensor([n]), block_size=16,
                                 active_ratio=0.25, min_blocks=4, local_blocks=2)
    scores = score_blocks_ref(group_query(q[None], 2), kmin[None], kmax[None])[0]
    mask = selection.keep_top(scores, budget, 2)
    assert mask.sum(-1).tolist() == [budget, budget]
    assert mask[:, -2:].all()
    for g in range(2):
        assert mask[g].nonzero()[:, 0].tolist() == table[0, g, :budget].tolist()


def test_layer_recall_mass_accounting():
    q, k, kmin, kmax, n = _layer(1)
    needle = [40, 41, 42]
    s = selection.SelectionSettings(ratio=0.2, min_blocks=2)
    r = selection.layer_recall(q, k, kmin, kmax, n, needle, s)
    for g in range(2):
        # The oracle keeps the blocks of largest group mass: no other choice of that size keeps more.
        assert r["kept"]["oracle"][g] >= max(r["kept"]["spec"][g], r["kept"]["head-max"][g]) - 1e-6
        assert 0 < r["kept"]["spec"][g] < 1 and 0 <= r["needle_share"][g] <= 1
    # Needle share is the largest head's softmax mass on the needle positions.
    keys = k[:, :n].repeat_interleave(3, 0)
    p = torch.softmax((keys @ q[:, :, None])[..., 0] / 4.0, -1)
    assert r["needle_share"][0] == pytest.approx(p[:3, needle].sum(-1).max().item(), rel=1e-5)
    full = selection.layer_recall(q, k, kmin, kmax, n, needle, selection.SelectionSettings(ratio=1.0, min_blocks=2))
    for v in selection.VARIANTS:
        assert full["kept"][v] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert full["needle_kept"][v] == pytest.approx([1.0, 1.0], abs=1e-5)


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_needle_positions_find_whole_values():
    text = "a 123 b 4123 c 123."
    ids = [ord(c) for c in text]
    assert selection.needle_positions(_CharTokenizer(), ids, ["123"]) == [2, 3, 4, 15, 16, 17]
    assert selection.needle_positions(_CharTokenizer(), ids, ["999"]) == []


def test_only_needle_tasks():
    with pytest.raises(ValueError, match="needle tasks"):
        selection.SelectionSettings(tasks=("cwe",))
