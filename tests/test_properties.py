"""Property-based tests (hypothesis): kernels against their references, and config validation.

- `select_blocks` (Triton, on CPU through the interpreter) chooses the same blocks as
  `select_blocks_ref` for random ragged lengths, budgets, local blocks, G, D, block sizes, pools
  and methods (blocks whose scores tie the threshold within fp32 rounding may swap).
- `sparse_decode` equals `sparse_decode_ref` within the suite's tolerance rule, for random
  lengths, tables (also shuffled, with holes), G, D, block sizes, splits and dtypes; cache slots
  past each row's length are NaN, so reading one fails.
- ResaConfig / SamplingConfig: a configuration is accepted exactly when an independent statement
  of the rules says it is valid; an accepted one passes `resa.validate` and runs (selection on
  random summaries, sampling on random logits); a rejected one raises ConfigError naming a bad field.

Examples are few (derandomized, no deadline) so that each property takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: kernels are bound to the interpreter when defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from resa import validate  # noqa: E402
from resa.config import GROUP_POOLS, MODES, RECTIFY_VARIANTS, ConfigError, ResaConfig  # noqa: E402
from resa.errors import UsageError  # noqa: E402
from resa.kernels import select_blocks, sparse_decode  # noqa: E402
from resa.ref import block_budget, block_scores_ref, block_summaries_ref, select_blocks_ref, sparse_decode_ref  # noqa: E402
from resa.sampling import SEED_MAX, SamplingConfig, make_generator, sample  # noqa: E402
from tests.paging import page_table, summaries_to_pool, to_pool  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEW = settings(max_examples=20, derandomize=True, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MANY = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# ---- kernel inputs ------------------------------------------------------------------------------

@st.composite
def attention_shapes(draw, block_sizes, max_g):
    """Ragged lengths of 1..12 blocks, KV heads, group size, head dim, block size, a data seed."""
    bs = draw(st.sampled_from(block_sizes))
    rows = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, 12 * bs), min_size=rows, max_size=rows))
    return dict(lengths=lengths, hkv=draw(st.integers(1, 2)), g=draw(st.integers(1, max_g)),
                d=draw(st.sampled_from([64, 128])), bs=bs, seed=draw(st.integers(0, 2**16)))


def random_cache(lengths, hkv, d, dtype, seed):
    """K/V [B, HKV, Nmax, D] with every slot past a row's length NaN."""
    gen = torch.Generator().manual_seed(seed)
    B, n = len(lengths), max(lengths)
    k = torch.randn(B, hkv, n, d, generator=gen)
    v = torch.randn(B, hkv, n, d, generator=gen)
    dead = (torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None])[:, None, :, None]
    k = torch.where(dead, float("nan"), k)
    v = torch.where(dead, float("nan"), v)
    return k.to(dtype), v.to(dtype), gen


def summaries(k, lengths, bs):
    """Block min/max of the live keys; blocks past a row's last block NaN (must not be read)."""
    lens = torch.tensor(lengths, dtype=torch.int64)
    kmin, kmax = block_summaries_ref(torch.nan_to_num(k.float(), nan=0.0), lens, bs)
    nb = kmin.shape[2]
    dead = (torch.arange(nb)[None, :] >= ((lens + bs - 1) // bs)[:, None])[:, None, :, None]
    return torch.where(dead, float("nan"), kmin), torch.where(dead, float("nan"), kmax), lens


# ---- selection ----------------------------------------------------------------------------------

def check_selection(table, nsel, ref_table, ref_nsel, scores, lengths, bs, ratio, min_blocks, local):
    """Same budgets and block sets; a block may differ from the reference's only if its score ties
    the selection threshold within fp32 rounding of a different summation order."""
    table, nsel = table.cpu(), nsel.cpu()
    assert torch.equal(nsel, ref_nsel), (nsel.tolist(), ref_nsel.tolist())
    B, HKV, _ = ref_table.shape
    for b in range(B):
        n, nb = int(ref_nsel[b]), -(-lengths[b] // bs)
        assert n == block_budget(nb, ratio, min_blocks)
        for h in range(HKV):
            got, want = table[b, h], ref_table[b, h]
            assert bool((got[n:] == -1).all()), f"row {b} head {h}: slots past the budget must be -1"
            chosen = got[:n].tolist()
            assert chosen == sorted(set(chosen)) and all(0 <= i < nb for i in chosen), chosen
            assert set(range(max(nb - local, 0), nb)) <= set(chosen), "the newest blocks are always kept"
            swapped = set(chosen) ^ set(want[:n].tolist())
            if swapped:
                s = scores[b, h]
                free = [i for i in want[:n].tolist() if i < nb - local]
                threshold = min(float(s[i]) for i in free)
                for i in swapped:
                    assert abs(float(s[i]) - threshold) <= 1e-5 * (1 + abs(threshold)), (b, h, i)


@FEW
@given(shape=attention_shapes(block_sizes=[4, 8, 16, 32], max_g=9),
       ratio=st.floats(0.02, 1.0), min_blocks=st.integers(1, 6), local=st.integers(1, 3),
       method=st.sampled_from(["two_pass", "fused"]), topn=st.sampled_from(["bisect", "interp"]),
       pool=st.sampled_from(GROUP_POOLS), empty_row=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_select_blocks_matches_reference(shape, ratio, min_blocks, local, method, topn, pool, empty_row, dtype):
    lengths, hkv, g, d, bs = shape["lengths"], shape["hkv"], shape["g"], shape["d"], shape["bs"]
    local = min(local, min_blocks)
    if empty_row:
        lengths = lengths + [0]  # a row with nothing cached selects nothing
    k, _, gen = random_cache([max(n, 1) for n in lengths], hkv, d, torch.float32, shape["seed"])
    kmin, kmax, lens = summaries(k, lengths, bs)
    q = torch.randn(len(lengths), hkv * g, d, generator=gen)
    q, kmin, kmax = q.to(dtype), kmin.to(dtype), kmax.to(dtype)
    slots = block_budget(kmin.shape[2], ratio, min_blocks) + 1
    kw = dict(block_size=bs, active_ratio=ratio, min_blocks=min_blocks, local_blocks=local, num_slots=slots,
              group_pool=pool)
    # The kernel reads a paged copy (blocks shuffled through a table); the reference the contiguous one.
    pages, nphys = page_table([max(n, 1) for n in lengths], bs, kmin.shape[2], seed=shape["seed"])
    pmin, pmax = summaries_to_pool(kmin, pages, nphys), summaries_to_pool(kmax, pages, nphys)
    table, nsel = select_blocks(q.to(DEVICE), pmin.to(DEVICE), pmax.to(DEVICE), pages.to(DEVICE), lens.to(DEVICE),
                                method=method, topn=topn, **kw)
    ref_table, ref_nsel = select_blocks_ref(q, kmin, kmax, lens, **kw)
    check_selection(table, nsel, ref_table, ref_nsel, block_scores_ref(q, kmin, kmax, pool), lengths, bs,
                    ratio, min_blocks, local)


# ---- sparse attention ---------------------------------------------------------------------------

def lowp_sparse_attention(q, k, v, lengths, table, bs):
    """The same attention done by PyTorch densely with a token mask, in the inputs' dtype: the
    rounding a low-precision implementation is allowed (the tolerance baseline)."""
    B, H, D = q.shape
    HKV, n = k.shape[1], k.shape[2]
    block_of = torch.arange(n) // bs
    live = torch.zeros(B, HKV, n, dtype=torch.bool)
    for b in range(B):
        for h in range(HKV):
            ids = table[b, h][table[b, h] >= 0].cpu()
            live[b, h] = torch.isin(block_of, ids) & (torch.arange(n) < lengths[b])
    zero = torch.zeros((), dtype=k.dtype)
    kz = torch.where(live[..., None], k.cpu(), zero)
    vz = torch.where(live[..., None], v.cpu(), zero)
    s = (q.cpu().view(B, HKV, H // HKV, D) @ kz.transpose(-1, -2)) * (D ** -0.5)
    s = s.float().masked_fill(~live[:, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return (p @ vz).reshape(B, H, D)


@FEW
@given(shape=attention_shapes(block_sizes=[8, 16, 32, 64], max_g=16),
       ratio=st.floats(0.05, 1.0), min_blocks=st.integers(1, 5), splits=st.sampled_from([None, 1, 2, 3]),
       shuffle=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_sparse_decode_matches_reference(shape, ratio, min_blocks, splits, shuffle, dtype):
    lengths, hkv, g, d, bs = shape["lengths"], shape["hkv"], shape["g"], shape["d"], shape["bs"]
    k, v, gen = random_cache(lengths, hkv, d, dtype, shape["seed"])
    q = torch.randn(len(lengths), hkv * g, d, generator=gen).to(dtype)
    kmin, kmax, lens = summaries(k, lengths, bs)
    table, nsel = select_blocks_ref(q, kmin, kmax, lens, block_size=bs, active_ratio=ratio, min_blocks=min_blocks)
    if shuffle:  # slot order and holes (-1) anywhere must not matter
        table = torch.cat([table, torch.full_like(table[..., :1], -1)], dim=-1)
        order = torch.randperm(table.shape[-1], generator=gen)
        table, nsel = table[..., order].contiguous(), None
    pages, nphys = page_table(lengths, bs, seed=shape["seed"])
    got = sparse_decode(q.to(DEVICE), to_pool(k, pages, nphys, bs).to(DEVICE), to_pool(v, pages, nphys, bs).to(DEVICE),
                        pages.to(DEVICE), lens.to(DEVICE), table.to(DEVICE),
                        num_selected=None if nsel is None else nsel.to(DEVICE), num_splits=splits)
    ref = sparse_decode_ref(q, k, v, lens, table, bs)
    baseline = None if dtype == torch.float32 else lowp_sparse_attention(q, k, v, lengths, table, bs)
    assert_close(got, ref, baseline)


# ---- configuration validation ---------------------------------------------------------------------

def _odd_values():
    """Values a caller might pass by mistake: wrong types, bools, NaN/inf, out-of-range numbers."""
    return st.one_of(st.none(), st.just(True), st.booleans(), st.text(max_size=3), st.just(float("nan")), st.just(float("inf")),
                     st.floats(-2, 40), st.integers(-3, 3), st.lists(st.integers(0, 3), max_size=1))


@st.composite
def settings_with_mistakes(draw, valid: dict):
    """Valid settings with up to two fields replaced by an odd value (about half stay valid)."""
    kw = {name: draw(strategy) for name, strategy in valid.items()}
    for name in draw(st.lists(st.sampled_from(sorted(valid)), max_size=2, unique=True)):
        kw[name] = draw(_odd_values())
    return kw


def _real_int(x) -> bool:
    return type(x) is int


def _real_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def resa_problems(kw: dict) -> set[str]:
    """The fields of `kw` that break ResaConfig's documented rules (stated independently here)."""
    bad = set()
    for name, choices in (("mode", MODES), ("rectify_variant", RECTIFY_VARIANTS), ("group_pool", GROUP_POOLS)):
        if not (isinstance(kw[name], str) and kw[name] in choices):
            bad.add(name)
    for name, lo in (("block_size", 1), ("min_blocks", 1), ("rectify_every", 0), ("prefill_chunk", 1)):
        if not (_real_int(kw[name]) and kw[name] >= lo):
            bad.add(name)
    if not (_real_number(kw["active_ratio"]) and kw["active_ratio"] > 0):
        bad.add("active_ratio")
    top = kw["min_blocks"] if "min_blocks" not in bad else math.inf
    if not (_real_int(kw["local_blocks"]) and 1 <= kw["local_blocks"] <= top):
        bad.add("local_blocks")
    return bad


RESA_FIELDS = settings_with_mistakes({
    "mode": st.sampled_from(MODES), "block_size": st.integers(1, 64), "active_ratio": st.floats(0.01, 1.5),
    "min_blocks": st.integers(4, 20), "local_blocks": st.integers(1, 4), "rectify_every": st.integers(0, 64),
    "rectify_variant": st.sampled_from(RECTIFY_VARIANTS), "prefill_chunk": st.integers(1, 4096),
    "group_pool": st.sampled_from(GROUP_POOLS),
})


@MANY
@given(kw=RESA_FIELDS, nb=st.integers(1, 40), seed=st.integers(0, 1000))
def test_resa_config_accepts_exactly_the_valid_settings(kw, nb, seed):
    bad = resa_problems(kw)
    event("rejected" if bad else "accepted")
    if bad:
        with pytest.raises(ConfigError) as info:
            ResaConfig(**kw)
        assert isinstance(info.value, UsageError)
        assert any(name in str(info.value) for name in bad), (str(info.value), bad)
        return
    cfg = ResaConfig(**kw)
    validate.check_generation_args(resa=cfg, sampling=SamplingConfig(), max_new_tokens=1)
    # It runs: the selection it describes is well formed on random summaries.
    gen = torch.Generator().manual_seed(seed)
    length = nb * cfg.block_size - int(torch.randint(0, cfg.block_size, (1,), generator=gen))
    kmin = torch.randn(1, 1, nb, 64, generator=gen)
    kmax = kmin + torch.rand(1, 1, nb, 64, generator=gen)
    q = torch.randn(1, 2, 64, generator=gen)
    table, nsel = select_blocks_ref(q, kmin, kmax, torch.tensor([length]), block_size=cfg.block_size,
                                    active_ratio=cfg.active_ratio, min_blocks=cfg.min_blocks,
                                    local_blocks=cfg.local_blocks, group_pool=cfg.group_pool)
    n = int(nsel[0])
    assert n == block_budget(nb, cfg.active_ratio, cfg.min_blocks) and min(nb, cfg.min_blocks) <= n <= nb
    assert nb - 1 in table[0, 0, :n].tolist()
    assert cfg.is_dense == (cfg.mode == "dense" or cfg.active_ratio >= 1)


def sampling_problems(kw: dict) -> set[str]:
    bad = set()
    if not (_real_number(kw["temperature"]) and kw["temperature"] >= 0):
        bad.add("temperature")
    if not (_real_int(kw["top_k"]) and kw["top_k"] >= 0):
        bad.add("top_k")
    if not (_real_number(kw["top_p"]) and 0 < kw["top_p"] <= 1):
        bad.add("top_p")
    if kw["seed"] is not None and not (_real_int(kw["seed"]) and 0 <= kw["seed"] <= SEED_MAX):
        bad.add("seed")
    return bad


SAMPLING_FIELDS = settings_with_mistakes({
    "temperature": st.one_of(st.just(0.0), st.floats(0, 3)), "top_k": st.integers(0, 8),
    "top_p": st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    "seed": st.one_of(st.none(), st.integers(0, SEED_MAX), st.integers(0, 100)),
})


@MANY
@given(kw=SAMPLING_FIELDS, vocab=st.integers(2, 50))
def test_sampling_config_accepts_exactly_the_valid_settings(kw, vocab):
    bad = sampling_problems(kw)
    event("rejected" if bad else "accepted")
    if bad:
        with pytest.raises(ConfigError) as info:
            SamplingConfig(**kw)
        assert any(name in str(info.value) for name in bad), (str(info.value), bad)
        return
    cfg = SamplingConfig(**kw)
    validate.check_generation_args(resa=ResaConfig(), sampling=cfg, max_new_tokens=1)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab))
    first = sample(logits, cfg, make_generator(cfg, "cpu"))
    assert first.shape == (3,) and bool(((first >= 0) & (first < vocab)).all())
    if cfg.greedy or cfg.top_k == 1:
        assert torch.equal(first, logits.argmax(dim=-1))
    if cfg.seed is not None:  # seeded sampling repeats itself
        assert torch.equal(sample(logits, cfg, make_generator(cfg, "cpu")), first)
