"""Verified ReSA (mode "verify", docs/method.md section 7): greedy output equals dense decoding
token for token while sparsity is really active and drafts are both accepted and rejected; the
sampled output follows the dense distribution (a bounded statistical test that a wrong
acceptance rule fails); after the rollbacks the cache equals a dense cache of the accepted
tokens; ragged rows are independent; bad settings are clear errors."""

import math

import pytest
import torch

import resa.verify as verify
from resa.config import ConfigError, ResaConfig
from resa.engine import Engine
from resa.errors import UsageError
from resa.generate import Collector, decode
from resa.sampling import SamplingConfig, probabilities
from tests.tiny import random_prompts, tiny_engine, tiny_model

# Block 4 and min_blocks 4: contexts above 16 tokens are sparse. At active 0.5 the tiny model's
# sparse argmax agrees with the dense one often enough that rounds both accept and reject.
SMALL = dict(block_size=4, min_blocks=4, active_ratio=0.5)
PROMPTS = random_prompts([300, 123])
NEW = 40


def _gen(engine, prompts=PROMPTS, new=NEW, sampling=SamplingConfig(), **cfg):
    return engine.generate_ids(prompts, resa=ResaConfig(**{**SMALL, **cfg}), sampling=sampling,
                               max_new_tokens=new, eos_token_ids=[], keep_cache=True)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def dense(engine):
    return _gen(engine, mode="dense")


@pytest.mark.parametrize("draft", [(2, 64), (5, 5)])
def test_greedy_verify_equals_dense_token_for_token(engine, dense, draft):
    """Adaptive and fixed draft lengths (5: windows of 6 cross block boundaries)."""
    out = _gen(engine, mode="verify", draft_min=draft[0], draft_max=draft[1])
    sparse = _gen(engine, mode="sparse")
    assert sparse.token_ids != dense.token_ids  # the drafts really are sparse-made ...
    assert out.token_ids == dense.token_ids  # ... and the verified output is dense's
    s = out.stats
    assert s.sparse_steps > 0 and s.windows > 0
    assert 0 < s.accepted < s.drafted, "some drafts must be accepted and some rejected"
    assert 1 < s.tokens_per_window <= 1 + s.accepted / s.row_windows + 1e-9  # less only where rows hit the end
    if draft == (5, 5):  # shorter only where fewer tokens remain to generate
        assert max(s.draft_widths) == 5 and s.draft_widths.count(5) >= len(s.draft_widths) - 3
    assert "accept=" in s.summary() and "tokens/window=" in s.summary()


def test_greedy_verify_on_other_tiny_models():
    """Another seed and a Qwen2-style model (biases, one KV head per three query heads)."""
    for seed, over in ((5, {}), (2, dict(arch="qwen2", attention_bias=True, num_heads=6, num_kv_heads=2))):
        engine = Engine(tiny_model(seed, **over))
        prompts = random_prompts([210, 77], seed=seed)
        dense = _gen(engine, prompts, new=30, mode="dense")
        out = _gen(engine, prompts, new=30, mode="verify")
        assert out.token_ids == dense.token_ids, (seed, over)
        assert 0 < out.stats.accepted < out.stats.drafted


def _dense_cache_equal(engine, out, prompts):
    """The verify run's cache equals a dense prefill of the prompt + the fed tokens (all emitted
    ones but the last, which is pending): K/V and every block summary."""
    lengths = out.runner.lengths
    for b, p in enumerate(prompts):
        fed = list(p) + out.token_ids[b][:-1]
        assert lengths[b] == len(fed)
        ref = engine.open(1, len(fed), SMALL["block_size"])
        ref.extend([fed], 64)
        got, want = out.cache.row(b, len(fed)), ref.cache.row(0, len(fed))
        for name in ("k", "v", "kmin", "kmax"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4,
                                       msg=lambda m, name=name: f"row {b} {name}: {m}")


def test_cache_after_rollbacks_equals_dense_cache_of_accepted_tokens(engine):
    """Ends at several lengths (so the last round both rejected and accepted somewhere): the
    cache holds exactly the accepted tokens, with dense K/V and exact summaries, including the
    partial last block a rollback cut."""
    for new in (9, 14, 17, 22):
        out = _gen(engine, new=new, mode="verify", draft_min=4, draft_max=4)
        _dense_cache_equal(engine, out, PROMPTS)
        # Blocks past the end went back to the pool.
        bs = SMALL["block_size"]
        assert [len(h) for h in out.cache.blocks] == [-(-n // bs) for n in out.runner.lengths]


def test_ragged_rows_are_independent(engine):
    """Rows of one batch (different lengths, different acceptance per round) give what each
    gives alone: tokens and cache."""
    prompts = random_prompts([300, 123, 57], seed=7)
    batch = _gen(engine, prompts, new=25, mode="verify", draft_min=3, draft_max=3)
    for b, p in enumerate(prompts):
        alone = _gen(engine, [p], new=25, mode="verify", draft_min=3, draft_max=3)
        assert alone.token_ids[0] == batch.token_ids[b]
        n = alone.runner.lengths[0]
        assert batch.runner.lengths[b] == n
        torch.testing.assert_close(batch.cache.row(b, n).k, alone.cache.row(0, n).k, rtol=1e-4, atol=1e-4)


def test_rounds_accept_ragged_counts(engine, monkeypatch):
    """Within one round rows accept different counts (the case the per-row rollback exists for)."""
    seen = []
    real = verify.greedy_accept

    def spy(drafts, dense_logits):
        accepted, nxt = real(drafts, dense_logits)
        seen.append(accepted.tolist())
        return accepted, nxt

    monkeypatch.setattr(verify, "greedy_accept", spy)
    _gen(engine, new=30, mode="verify", draft_min=4, draft_max=4)
    assert any(len(set(a)) > 1 for a in seen)


def test_eos_stops_a_row_while_others_go_on(engine, dense):
    """A row that meets its EOS stops there (output cut like dense) while the other continues."""
    eos = dense.token_ids[1][7]
    want = [dense.token_ids[b][:dense.token_ids[b].index(eos)] if eos in dense.token_ids[b] else dense.token_ids[b]
            for b in range(2)]
    out = engine.generate_ids(PROMPTS, resa=ResaConfig(mode="verify", **SMALL), max_new_tokens=NEW,
                              eos_token_ids=[eos])
    assert out.token_ids == want
    assert out.finish_reasons[1] == "eos"


def test_draft_length_adapts_to_acceptance():
    """The rule picks the longest draft at full acceptance, the shortest at none, and grows with
    the acceptance rate; a run whose drafts are always accepted climbs to long drafts."""
    grid = verify.draft_grid(2, 64)
    assert grid == [2, 4, 8, 16, 32, 64]
    cost = 0.3
    assert verify.best_draft(1.0, cost, grid) == 64
    assert verify.best_draft(0.0, cost, grid) == 2
    picks = [verify.best_draft(a, cost, grid) for a in (0.3, 0.6, 0.8, 0.9, 0.97)]
    assert picks == sorted(picks) and picks[0] < picks[-1]
    control = verify.DraftLength(2, 64, 2)
    for _ in range(12):
        w = control.choose([0, 1], cost)
        control.observe(0, w, w)  # row 0: everything accepted
        control.observe(1, 0, w)  # row 1: nothing accepted
    assert control.chosen == [64, 2]
    # The batch drafts for all its rows: one row that accepts everything does not make three
    # that accept little draft long (the rows' largest w would), four such rows do.
    costs = verify.Costs(0.58, 0.046, 1.1)
    batch = verify.DraftLength(2, 64, 4)
    batch.s, batch.f = [50.0, 1.0, 1.0, 1.0], [0.01, 1.0, 1.0, 1.0]
    w = batch.choose([0, 1, 2, 3], costs)
    assert batch.chosen[0] >= 32 and w < batch.chosen[0]
    assert w == max(batch.grid, key=lambda g: sum(verify.speedup(batch.alpha(b), g, costs) for b in range(4)))
    assert batch.choose([0], costs) == batch.chosen[0]
    # The break-even acceptance rate is where the best draft's speedup is 1.
    a = verify.break_even(cost, grid)
    assert max(verify.speedup(a + 1e-6, w, cost) for w in grid) >= 1 > max(verify.speedup(a - 1e-3, w, cost)
                                                                            for w in grid)


def test_adaptive_draft_grows_when_sparse_agrees(engine, monkeypatch):
    """At a high active ratio the sparse drafts nearly always agree: w grows past its minimum
    where sparse steps are cheap (the tiny model's cost is all weights, so its own cost model
    says drafting never pays and keeps w at the minimum: here the step cost is set as at a long
    context)."""
    monkeypatch.setattr(verify, "step_cost", lambda *args: verify.Costs(0.2))
    out = _gen(engine, new=60, mode="verify", active_ratio=0.9)
    assert max(out.stats.draft_widths) > 2
    assert out.stats.acceptance_rate > 0.5


def test_greedy_verify_equals_dense_on_the_default_model():
    """The real default model (SmolLM2-135M) with a 730-token prompt: 4 of 46 blocks per sparse
    step, drafts both accepted and rejected, output identical to dense."""
    from resa.errors import LoaderError

    try:
        engine = Engine.load()
    except LoaderError as exc:
        pytest.skip(str(exc))
    story = " ".join(f"Line {i}: the keeper counted {i * 7 % 13} lanterns." for i in range(60))
    ids = engine.tokenizer.encode(story + " Line 60: the keeper")
    cfg = ResaConfig(mode="verify", min_blocks=4, active_ratio=0.05, draft_min=4, draft_max=4)
    dense = engine.generate_ids([ids], resa=cfg.with_(mode="dense"), max_new_tokens=24, eos_token_ids=[])
    out = engine.generate_ids([ids], resa=cfg, max_new_tokens=24, eos_token_ids=[])
    assert out.token_ids == dense.token_ids
    assert out.stats.sparse_steps > 0  # drafted by steps that kept fewer blocks than the row has
    assert 0 < out.stats.accepted < out.stats.drafted


# ---- sampling: the output follows the dense distribution ----

# Vocabulary of 5, so the joint law of the first three tokens has 125 outcomes, computed exactly.
VOCAB = 5
SAMPLING = SamplingConfig(temperature=1.5, seed=11)
ROWS = 3000
# Significance of the chi-square test: a correct implementation fails with probability 1e-4 for
# a random seed (the seed is fixed, so the test itself is deterministic).
ALPHA = 1e-4


def _chi2_quantile(df: int, alpha: float) -> float:
    """Upper alpha quantile of chi-square(df) by the Wilson-Hilferty approximation."""
    # Standard normal quantile by bisection on erfc.
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha else (lo, mid)
    z = lo
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _exact_law(model, prompt, cfg: SamplingConfig) -> dict[tuple[int, ...], float]:
    """P(x0, x1, x2) of dense sampling, from the model's full dense forward of every prefix."""
    law = {}
    seqs = [(a, b) for a in range(VOCAB) for b in range(VOCAB)]
    ids = torch.tensor([list(prompt) + list(s) for s in seqs])
    probs = probabilities(model.forward_full(ids, block_size=4)[:, -3:], cfg)  # [S, 3, V]
    for i, (a, b) in enumerate(seqs):
        for c in range(VOCAB):
            law[a, b, c] = float(probs[i, 0, a] * probs[i, 1, b] * probs[i, 2, c])
    return law


def _chi2(engine, prompt, law):
    """Chi-square statistic of ROWS verify samples of (x0, x1, x2) against `law` (outcomes with
    expected counts under 5 pooled into one cell), and its degrees of freedom."""
    cfg = ResaConfig(mode="verify", block_size=4, min_blocks=2, active_ratio=0.25, draft_min=3, draft_max=3)
    runner = engine.open(ROWS, len(prompt) + 8, 4)
    logits = runner.extend([prompt] * ROWS, 64)
    sink = Collector(ROWS, [], None)
    gen = torch.Generator().manual_seed(SAMPLING.seed)
    stats = decode(runner, logits, resa=cfg, pick=None, sink=sink, max_new_tokens=3, sampling=SAMPLING,
                   generator=gen)
    assert stats.windows >= 1 and stats.sparse_steps > 0
    return _chi2_of(sink.outputs, law) + (stats,)


def _chi2_of(outputs, law):
    """(statistic, degrees of freedom) of the sampled sequences `outputs` against `law`."""
    counts: dict[tuple[int, ...], int] = {}
    for out in outputs:
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    stat, cells, rest_obs, rest_exp = 0.0, 0, 0, 0.0
    for key, p in law.items():
        exp = p * len(outputs)
        if exp < 5:
            rest_obs, rest_exp = rest_obs + counts.get(key, 0), rest_exp + exp
            continue
        stat += (counts.get(key, 0) - exp) ** 2 / exp
        cells += 1
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        cells += 1
    return stat, cells - 1


@pytest.fixture(scope="module")
def small_vocab():
    model = tiny_model(4, vocab_size=VOCAB)
    prompt = random_prompts([40], vocab=VOCAB, seed=3)[0]
    return Engine(model), prompt, _exact_law(model, prompt, SAMPLING)


def test_sampling_follows_the_dense_distribution(small_vocab):
    engine, prompt, law = small_vocab
    stat, df, stats = _chi2(engine, prompt, law)
    assert 0 < stats.accepted < stats.drafted  # sparse drafts, both outcomes
    assert df >= 20
    assert stat < _chi2_quantile(df, ALPHA), (stat, df)


def test_a_wrong_acceptance_rule_fails_the_sampling_test(small_vocab, monkeypatch):
    """The same test with the correction sampled from the dense distribution instead of the
    residual max(q - p, 0) (a classic mistake: it over-weights the drafted tokens) and with
    every draft accepted (the sparse model's law) must fail."""
    engine, prompt, law = small_vocab
    real = verify.speculative_accept

    def accept_all(drafts, p_draft, q_dense, generator):
        B, w = drafts.shape
        accepted = torch.full((B,), w, dtype=torch.int64)
        return accepted, torch.multinomial(q_dense[:, w], 1, generator=generator)[:, 0]

    for wrong in (residual_is_q(real), accept_all):
        monkeypatch.setattr(verify, "speculative_accept", wrong)
        stat, df, _ = _chi2(engine, prompt, law)
        assert stat > _chi2_quantile(df, ALPHA), (wrong, stat, df)


def _batched_outputs(engine, prompt):
    """ROWS seeded verify requests of 3 tokens through a continuous batch (their own generators,
    drafts and rollbacks, 250 at a time): their outputs."""
    from resa.batching import Batcher, Request

    cfg = ResaConfig(mode="verify", block_size=4, min_blocks=2, active_ratio=0.25, draft_min=3, draft_max=3)
    batcher = Batcher(engine, max_num_seqs=250, max_num_batched_tokens=1 << 16, max_waiting=ROWS, block_size=4)
    reqs = [batcher.submit(Request(prompt, max_tokens=3, resa=cfg, eos_token_ids=[],
                                   sampling=SamplingConfig(temperature=SAMPLING.temperature, seed=i)))
            for i in range(ROWS)]
    batcher.run_until_done()
    assert sum(r.stats.verify_windows for r in reqs) >= ROWS // 2 and batcher.blocks_in_use() == 0
    return [r.output_ids for r in reqs], reqs


def test_sampled_verify_in_a_continuous_batch_follows_the_dense_distribution(small_vocab, monkeypatch):
    """The batcher's verify rounds (one request at a time inside shared passes) sample the dense
    law too, by the same test; every draft accepted (the sparse model's law) fails it."""
    engine, prompt, law = small_vocab
    outputs, reqs = _batched_outputs(engine, prompt)
    assert 0 < sum(r.stats.accepted for r in reqs) < sum(r.stats.drafted for r in reqs)
    stat, df = _chi2_of(outputs, law)
    assert df >= 20 and stat < _chi2_quantile(df, ALPHA), (stat, df)

    def accept_all(drafts, p_draft, q_dense, generator):
        B, w = drafts.shape
        return torch.full((B,), w, dtype=torch.int64), torch.multinomial(q_dense[:, w], 1, generator=generator)[:, 0]

    monkeypatch.setattr(verify, "speculative_accept", accept_all)
    stat, df = _chi2_of(_batched_outputs(engine, prompt)[0], law)
    assert stat > _chi2_quantile(df, ALPHA), (stat, df)


def _sample_at(q_dense, accepted, generator):
    rows = torch.arange(q_dense.shape[0])
    return torch.multinomial(q_dense[rows, accepted], 1, generator=generator)[:, 0]


def residual_is_q(real):
    """The rule with the right acceptance test but the correction drawn from q, not q - p."""

    def rule(drafts, p_draft, q_dense, generator):
        accepted, _ = real(drafts, p_draft, q_dense, generator)
        return accepted, _sample_at(q_dense, accepted, generator)

    return rule


# ---- settings ----

def test_bad_draft_settings_are_config_errors():
    with pytest.raises(ConfigError, match="draft_min"):
        ResaConfig(mode="verify", draft_min=0)
    with pytest.raises(ConfigError, match="draft_max"):
        ResaConfig(mode="verify", draft_min=8, draft_max=4)
    with pytest.raises(ConfigError, match="draft_max"):
        ResaConfig(mode="verify", draft_max=1000)
    with pytest.raises(ConfigError, match="mode must be one of"):
        ResaConfig(mode="verified")


def test_verify_needs_the_sampling_settings(engine):
    runner = engine.open(1, 64, 4)
    logits = runner.extend([[1, 2, 3]], 64)
    with pytest.raises(UsageError, match="verify"):
        decode(runner, logits, resa=ResaConfig(mode="verify", **SMALL), pick=lambda lg, t: lg.argmax(-1),
               sink=Collector(1, [], None), max_new_tokens=4)
