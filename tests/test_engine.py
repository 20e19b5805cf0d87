"""End-to-end method invariants on a tiny random model (NaN-poisoned caches throughout)."""

import pytest
import torch

from resa.cache import KVCache
from resa.config import ResaConfig
from resa.engine import Engine, PromptTooLongError
from resa.runner import Runner
from resa.sampling import SamplingConfig
from tests.tiny import random_prompts, tiny_engine

# Block 4 and min_blocks 4 make contexts above 16 tokens really sparse at tiny sizes.
SMALL = dict(block_size=4, min_blocks=4, active_ratio=0.1)
PROMPTS = random_prompts([300, 123])
NEW = 40


def _gen(engine, prompts=PROMPTS, **cfg):
    kw = {**SMALL, **cfg}
    return engine.generate_ids(prompts, resa=ResaConfig(**kw), max_new_tokens=NEW, eos_token_ids=[],
                               keep_cache=True)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def dense(engine):
    return _gen(engine, mode="dense")


def test_sparsity_changes_the_output(engine, dense):
    """Guards the other invariants: at these settings sparse decoding really differs from dense."""
    sparse = _gen(engine, mode="sparse")
    assert sparse.token_ids != dense.token_ids
    assert sparse.stats.kv_read_fraction < 0.6


def test_group_pool_max_reaches_the_selection(engine, dense):
    """group_pool="max" decodes through the same engine and selects other blocks than "mean"
    (the tiny model has G = 2 query heads per KV head); an unknown pool is a config error."""
    mean = _gen(engine, mode="sparse")
    pooled = _gen(engine, mode="sparse", group_pool="max")
    assert pooled.token_ids != mean.token_ids
    assert pooled.stats.kv_read_fraction == pytest.approx(mean.stats.kv_read_fraction)  # same budgets
    with pytest.raises(ValueError, match="group_pool must be one of mean, max"):
        ResaConfig(group_pool="median")


def test_sparse_path_with_full_budget_gives_dense_tokens_and_kv(engine):
    """active_ratio 1 through the block-sparse code path (selection + sparse attention, not the
    dense shortcut the loop takes for it): every block is selected, so tokens, logits and K/V
    equal dense decoding step for step."""
    full = ResaConfig(mode="sparse", **{**SMALL, "active_ratio": 1.0})
    sparse_run, dense_run = engine.open(2, 400, 4), engine.open(2, 400, 4)
    logits = sparse_run.extend(PROMPTS, 64)
    dense_run.extend(PROMPTS, 64)
    selected = []
    for _ in range(12):
        tok = logits.argmax(-1)
        logits = sparse_run.step(tok, full, observe=lambda layer, q: selected.append(
            sparse_run.cache.plan_buffers(sparse_run.cache.max_blocks, False).num_selected.clone()))
        ref = dense_run.step(tok, None)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert selected, "the observer saw no layer"
    n = sparse_run.lengths
    for b in range(2):
        got, want = sparse_run.cache.row(b, n[b]), dense_run.cache.row(b, n[b])
        torch.testing.assert_close(got.k, want.k)
        torch.testing.assert_close(got.v, want.v)


def test_full_budget_steps_run_dense(engine, dense):
    """When every row would keep all its blocks the loop takes dense steps (same keys, no
    summaries read); the sparse path itself at full budget is tested through the runner below."""
    out = _gen(engine, mode="sparse", min_blocks=10_000)
    assert out.token_ids == dense.token_ids and out.stats.sparse_steps == 0


def test_fused_f1_is_dense(engine, dense):
    """Fused with f = 1: every token is fed by a rectification window (never a sparse step)."""
    out = _gen(engine, mode="resa", rectify_variant="fused", rectify_every=1)
    assert out.token_ids == dense.token_ids
    assert out.stats.rectifications == NEW - 1 and out.stats.sparse_steps == 0


def _dense_kv(engine, prompt, generated):
    """K/V of the sequence recomputed densely from scratch: [L, HKV, N, D] each."""
    runner = engine.open(1, len(prompt) + len(generated), 4)
    runner.extend([prompt + generated], 64)
    row = runner.cache.row(0, runner.lengths[0])
    return row.k, row.v


def test_paper_f1_leaves_kv_dense(engine):
    out = _gen(engine, mode="resa", rectify_variant="paper", rectify_every=1)
    for b, prompt in enumerate(PROMPTS):
        fed = out.token_ids[b][: NEW - 1]  # the last sampled token is never fed
        k, v = _dense_kv(engine, prompt, fed)
        n = len(prompt) + len(fed) - 1  # the newest fed token waits for the next rectification
        row = out.cache.row(b, n)
        torch.testing.assert_close(row.k, k[:, :, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(row.v, v[:, :, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_rectified_windows_equal_dense_recomputation(engine, variant):
    f = 8
    out = _gen(engine, mode="resa", rectify_variant=variant, rectify_every=f)
    assert out.stats.rectifications == (NEW - 2) // f if variant == "paper" else (NEW - 1) // f
    for b, prompt in enumerate(PROMPTS):
        fed = out.token_ids[b][: NEW - 1]
        k, v = _dense_kv(engine, prompt, fed)
        last_window_end = len(prompt) + ((NEW - 2) // f) * f if variant == "paper" else \
            len(prompt) + ((NEW - 1) // f) * f
        row = out.cache.row(b, len(prompt) + len(fed))
        torch.testing.assert_close(row.k[:, :, :last_window_end], k[:, :, :last_window_end], rtol=1e-4, atol=1e-4)
        # tokens fed sparsely after the last window differ from dense: the cache is really sparse-made
        assert not torch.allclose(row.k[:, :, last_window_end + 1:], k[:, :, last_window_end + 1:], atol=1e-4)


@pytest.mark.parametrize("mode,variant", [("sparse", "paper"), ("resa", "paper"), ("resa", "fused")])
def test_ragged_batch_rows_equal_rows_alone(engine, mode, variant):
    batch = _gen(engine, mode=mode, rectify_variant=variant, rectify_every=8)
    for b, prompt in enumerate(PROMPTS):
        alone = _gen(engine, prompts=[prompt], mode=mode, rectify_variant=variant, rectify_every=8)
        assert alone.token_ids[0] == batch.token_ids[b]


def test_resa_is_closer_to_dense_than_sparse(engine, dense):
    def agreement(out):
        return sum(a == b for ra, rb in zip(out.token_ids, dense.token_ids) for a, b in zip(ra, rb))

    assert agreement(_gen(engine, mode="resa", rectify_every=4)) >= agreement(_gen(engine, mode="sparse"))


def test_outputs_finite_with_poisoned_cache():
    engine = tiny_engine()  # a fresh pool: every block starts NaN
    prompts = random_prompts([1, 17, 64])
    out = engine.generate_ids(prompts, resa=ResaConfig(**SMALL), max_new_tokens=20, eos_token_ids=[],
                              keep_cache=True)
    for b, p in enumerate(prompts):
        n = len(p) + 19
        row = out.cache.row(b)  # every block the row holds
        assert torch.isfinite(row.k[:, :, :n]).all()
        assert torch.isnan(row.k[:, :, n:]).all()


def test_prompt_longer_than_context_is_a_clear_error():
    engine = tiny_engine(max_position_embeddings=64)
    with pytest.raises(PromptTooLongError, match="context of 64"):
        engine.generate_ids(random_prompts([60]), max_new_tokens=10)


def test_eos_stops_a_row_but_not_the_batch(engine, dense):
    eos = dense.token_ids[0][5]
    out = engine.generate_ids(PROMPTS, resa=ResaConfig(mode="dense", **SMALL), max_new_tokens=NEW,
                              eos_token_ids=[eos])
    assert out.token_ids[0] == dense.token_ids[0][: dense.token_ids[0].index(eos)]
    assert out.finish_reasons[0] == "eos"


def test_seeded_sampling_is_reproducible(engine):
    s = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    a = engine.generate_ids(PROMPTS, sampling=s, max_new_tokens=10, eos_token_ids=[])
    b = engine.generate_ids(PROMPTS, sampling=s, max_new_tokens=10, eos_token_ids=[])
    assert a.token_ids == b.token_ids


def test_stop_text_holds_back_what_may_start_a_stop_and_cuts_at_it():
    from resa.stops import StopText

    t = StopText(["6,", "END"])
    assert t.push(" 5") == (" 5", False)
    assert t.push(", 6") == (", ", False)  # "6" may start "6,": held back
    assert t.push(" x") == ("6 x", False)  # ... it did not
    assert t.push(" E") == (" ", False) and t.push("N") == ("", False)
    assert t.push("D more") == ("", True) and t.text == " 5, 6 x "  # the stop spans three pieces
    assert t.push("after") == ("", True)
    u = StopText(["abc"])
    assert u.push("xab") == ("x", False) and u.flush() == "ab" and u.text == "xab"
    assert StopText([]).push("anything") == ("anything", False)


def test_windows_decoded_at_full_budget_are_not_rectified(engine, dense):
    """Below min_blocks x block_size tokens every step is dense, so there is nothing to rectify."""
    prompts = random_prompts([5, 9])
    cfg = dict(mode="resa", block_size=4, min_blocks=64, rectify_every=8)
    out = engine.generate_ids(prompts, resa=ResaConfig(**cfg), max_new_tokens=30, eos_token_ids=[])
    ref = engine.generate_ids(prompts, resa=ResaConfig(mode="dense"), max_new_tokens=30, eos_token_ids=[])
    assert out.stats.rectifications == 0 and out.token_ids == ref.token_ids
    # Every block kept: dense steps, which read no block summaries.
    assert out.stats.sparse_steps == 0 and out.stats.kv_read_fraction == 1.0


@pytest.mark.parametrize("sync_every", [1, 3, 7])
def test_grouped_host_checks_give_the_same_output(engine, dense, sync_every):
    """Tokens reach the host in groups (no per-token sync): EOS and on_token stops inside a group
    cut the output at the same place as checking every token."""
    eos = dense.token_ids[0][5]
    stop_row1_at = 11
    seen = {0: [], 1: []}

    def on_token(row, tok):
        seen[row].append(tok)
        return row == 1 and len(seen[1]) == stop_row1_at

    out = engine.generate_ids(PROMPTS, resa=ResaConfig(mode="dense", **SMALL), max_new_tokens=NEW,
                              eos_token_ids=[eos], on_token=on_token, sync_every=sync_every)
    row0 = dense.token_ids[0][: dense.token_ids[0].index(eos)]
    assert out.token_ids[0] == row0 == seen[0]
    assert out.token_ids[1] == dense.token_ids[1][:stop_row1_at] == seen[1]
    assert out.finish_reasons == ["eos", "stop"]
    with pytest.raises(ValueError, match="sync_every"):
        engine.generate_ids(PROMPTS, max_new_tokens=4, sync_every=0)


def test_reused_buffers_give_the_same_output():
    """With reuse_buffers, batches share a power-of-two bucket cache across calls (spare rows
    decode a dummy prompt): outputs equal fresh, exact-size caches; a smaller later call reuses
    the same cache and runner, a larger bucket replaces it."""
    from tests.tiny import tiny_model

    model = tiny_model()
    pooled, fresh = Engine(model, reuse_buffers=True), Engine(model, reuse_buffers=False)
    prompts = random_prompts([150, 60, 97], seed=8)
    cfg = ResaConfig(mode="resa", rectify_every=8, **SMALL)
    a = pooled.generate_ids(prompts, resa=cfg, max_new_tokens=20, eos_token_ids=[])
    runner = pooled._pooled
    assert runner.batch == 4 and runner.capacity == 4096
    b = pooled.generate_ids(prompts[:2], resa=cfg, max_new_tokens=20, eos_token_ids=[])
    assert pooled._pooled is not None and pooled._pooled is not runner  # bucket 2, new runner
    c = pooled.generate_ids(prompts[::-1], resa=cfg, max_new_tokens=20, eos_token_ids=[])
    kept = pooled._pooled
    d = pooled.generate_ids(prompts[::-1][:3], resa=cfg, max_new_tokens=10, eos_token_ids=[])
    assert pooled._pooled is kept  # same bucket, smaller need: reused
    ref = fresh.generate_ids(prompts, resa=cfg, max_new_tokens=20, eos_token_ids=[])
    assert a.token_ids == ref.token_ids
    assert a.stats.kv_tokens_read == ref.stats.kv_tokens_read  # spare rows are not counted
    assert b.token_ids == a.token_ids[:2]
    assert c.token_ids == a.token_ids[::-1]
    assert d.token_ids == [t[:10] for t in c.token_ids]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_device_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Engine.load(device="cuda")


class _WindowSpy(Runner):
    """A runner that keeps the K/V each rectification window overwrites, before and after."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rewrites = []

    def window(self, tokens, overwrite, active=None, every=False):
        lo = [n - overwrite for n in self.lengths]
        before = [self.cache.row(b, lo[b] + overwrite).k[:, :, lo[b]:] for b in range(self.batch)]
        logits = super().window(tokens, overwrite, active, every)
        after = [self.cache.row(b, lo[b] + overwrite).k[:, :, lo[b]:] for b in range(self.batch)]
        if overwrite:
            self.rewrites.append((lo, before, after))
        return logits


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_each_rectification_turns_sparse_made_kv_into_dense_kv(engine, variant):
    """Exact cadence (paper: before feeding t = f, 2f, ...; fused: feeding t = f-1, 2f-1, ...) and
    each window's K/V goes from sparse-made (different from a dense recomputation) to dense."""
    f = 8
    cfg = ResaConfig(mode="resa", rectify_variant=variant, rectify_every=f, **SMALL)
    spy = _WindowSpy(engine.model, KVCache.create(2, 2, 2, 400, 16, 4))
    logits = spy.extend(PROMPTS, 64)
    out = engine.decode(spy, logits, resa=cfg, max_new_tokens=NEW, eos_token_ids=[])
    ts = [t for t, _, _ in out.stats.rectified_at]
    assert ts == ([t for t in range(1, NEW - 1) if t % f == 0] if variant == "paper"
                  else [t for t in range(NEW - 1) if t % f == f - 1])
    assert len(spy.rewrites) == out.stats.rectifications == len(ts) > 0
    for b, prompt in enumerate(PROMPTS):
        k_dense, _ = _dense_kv(engine, prompt, out.token_ids[b][: NEW - 1])
        for lo, before, after in spy.rewrites:
            width = before[b].shape[2]
            ref = k_dense[:, :, lo[b]:lo[b] + width]
            assert not torch.allclose(before[b], ref, atol=1e-3), "the window was not sparse-made"
            torch.testing.assert_close(after[b], ref, rtol=1e-4, atol=1e-4)


def test_prefill_progress_counts_every_prompt_token_once(engine):
    calls = []
    prompts = random_prompts([70, 20], seed=9)
    engine.generate_ids(prompts, resa=ResaConfig(**SMALL, prefill_chunk=16), max_new_tokens=2, eos_token_ids=[],
                        on_prefill=lambda done, total: calls.append((done, total)))
    assert [t for _, t in calls] == [90] * 5 and [d for d, _ in calls] == [32, 52, 68, 84, 90]
