"""CPU tests of the evaluation harness on tiny random models (no checkpoint, no download)."""

from __future__ import annotations

import json

import pytest

from resa.eval import drift, lm_sim
from resa.eval.data import token_sequences
from resa.eval.stats import cluster_bootstrap, wilson
from resa.eval.store import RunStore
from tests.tiny import tiny_engine


class ByteTokenizer:
    """Bytes modulo the tiny vocabulary: enough to cut token sequences from text."""

    def encode(self, text: str) -> list[int]:
        return [b % 97 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i + 32 for i in ids).decode("latin-1")


def _engine():
    e = tiny_engine()
    e.tokenizer = ByteTokenizer()
    return e


def test_wilson_and_bootstrap_bounds():
    p, lo, hi = wilson(5, 10)
    assert lo < p == 0.5 < hi
    m, lo, hi = cluster_bootstrap([[1, 0, 1], [0, 0], [1, 1, 1, 1]])
    assert lo <= m <= hi and m == pytest.approx(6 / 9)


def test_token_sequences_are_disjoint_and_deterministic():
    a = token_sequences(ByteTokenizer(), ["sample"], 50, 3, seed=0)
    b = token_sequences(ByteTokenizer(), ["sample"], 50, 3, seed=0)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert all(len(s.ids) == 51 for s in a)
    assert len({s.offset for s in a}) == 3


def test_repeated_4grams():
    assert drift.repeated_4grams([1, 2, 3, 4, 1, 2, 3, 4]) == [0, 0, 0, 0, 0, 0, 0, 1]


def test_lm_sim_dense_equals_sparse_when_budget_covers_everything(tmp_path):
    """With min_blocks covering the whole context, sparse-made KV is dense KV: every condition
    must score exactly like dense (the harness adds no error of its own)."""
    s = lm_sim.LMSimSettings(length=64, xs=(32, 0), ratios=(0.1,), sequences=2, batch=2,
                             corpora=("sample",), eval_tokens=8, min_blocks=16)
    store = RunStore(tmp_path, "t", "lm-sim", lm_sim.settings_dict(s), {})
    lm_sim.run(_engine(), store, s, progress=False)
    rows = {k: v["rows"] for k, v in store.cells().items()}
    for key, r in rows.items():
        for a, b in zip(r, rows["b0/dense"]):
            assert a["argmax"] == b["argmax"], key
            assert a["nll"] == pytest.approx(b["nll"], abs=1e-3), key


def test_lm_sim_resumes_without_recomputing(tmp_path):
    s = lm_sim.LMSimSettings(length=96, xs=(32,), ratios=(0.1,), sequences=2, batch=1,
                             corpora=("sample",), eval_tokens=8, min_blocks=1, block_size=4)
    store = RunStore(tmp_path, "t", "lm-sim", lm_sim.settings_dict(s), {})
    lm_sim.run(_engine(), store, s, progress=False)
    first = json.loads(store.path.read_text())["cells"]
    assert len(first) == 2 * 3
    again = RunStore(tmp_path, "t", "lm-sim", lm_sim.settings_dict(s), {})
    assert again.cells() == first

    class Boom:
        tokenizer = ByteTokenizer()

        def __getattr__(self, name):
            raise AssertionError("a finished run must not touch the model")

    lm_sim.run(Boom(), again, s, progress=False)
    summary = lm_sim.summarize(again.cells(), {})
    assert summary[0]["condition"] == "dense" and summary[0]["texts"] == 2


def test_drift_runs_every_mode_and_dense_agrees_with_itself(tmp_path):
    s = drift.DriftSettings(prompt_tokens=40, new_tokens=24, prompts=2, ratio=0.1, rectify_every=8,
                            min_blocks=1, block_size=4, corpora=("sample",), buckets=3)
    store = RunStore(tmp_path, "d", "drift", drift.settings_dict(s), {})
    drift.run(_engine(), store, s, progress=False)
    summ = drift.summarize(store.cells(), store.data["settings"])
    assert set(summ["modes"]) == set(drift.MODES)
    assert summ["modes"]["dense"]["agree"][0] == 1.0
    assert summ["modes"]["dense"]["nll_ratio"][0] == pytest.approx(1.0)
    assert len(summ["modes"]["sparse"]["buckets"]) == 3
    assert all(len(r["tokens"]) == 24 for r in store.get("resa-fused")["rows"])


def test_paired_gap_uses_only_shared_texts_and_pairs_them():
    def cell(texts, nll):
        return {"rows": [{"corpus": "c", "doc": d, "offset": 0, "top1": [1, 0], "top3": [1, 1], "nll": [v, v]}
                         for d, v in zip(texts, nll)]}

    a = {"b0/x0/r0.1": cell([1, 2, 3], [2.0, 3.0, 9.0])}
    b = {"b0/x32/r0.1": cell([1, 2], [1.5, 2.0]), "b0/dense": cell([1, 2], [0.0, 0.0])}
    gap = lm_sim.paired_gap(a, "x0/r0.1", b, "x32/r0.1")
    assert gap["texts"] == 2  # text 3 is only in a
    assert gap["nll"][0] == pytest.approx(0.75) and gap["top3"][0] == 0.0
    assert lm_sim.paired_gap(a, "x0/r0.1", b, "ub/r0.1")["texts"] == 0


def test_wilson_interval_holds_the_rate_at_the_edges():
    for k, n in ((10, 10), (0, 10), (7, 7), (0, 3)):
        p, lo, hi = wilson(k, n)
        assert lo <= p <= hi and 0.0 <= lo and hi <= 1.0
    assert wilson(10, 10)[2] == 1.0
