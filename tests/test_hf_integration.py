"""resa.hf on tiny random transformers models: dense equivalence with transformers' `generate`,
token equality with our own engine, the rectification cadence and the rectified cache contents."""

from __future__ import annotations

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import resa.hf as rhf  # noqa: E402
from resa.config import ModelConfig, ResaConfig  # noqa: E402
from resa.engine import Engine  # noqa: E402
from resa.model import Transformer  # noqa: E402
from resa.ref.summaries import block_summaries_ref  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

from tests.hf_models import PAD, VOCAB, _config, hf_model  # noqa: E402,F401
PROMPT = 300  # 75 blocks of 4: with min_blocks 4 and ratio 0.1 a step reads 8 of them
NEW = 40
SPARSE = ResaConfig(block_size=4, min_blocks=4, active_ratio=0.1, rectify_every=8)






def our_engine(model) -> Engine:
    """Our engine over the same weights (transformers' parameter names are ours)."""
    ours = Transformer(ModelConfig.from_hf(model.config.to_dict()), backend="torch")
    ours.load_weights(dict(model.state_dict()))
    return Engine(ours.eval())


def prompts(lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, PAD, (n,), generator=g).tolist() for n in lengths]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


def resa_generate(model, ids, resa: ResaConfig, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, custom_generate=rhf.generate, resa_config=resa, eos_token_id=None,
                          pad_token_id=PAD, **kwargs)


def cache_of(out) -> rhf.ResaCache:
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@pytest.fixture(scope="module")
def llama():
    return rhf.enable(hf_model("llama"), SPARSE, backend="torch")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_dense_resa_equals_transformers_generate(arch):
    model = hf_model(arch)
    ids = torch.tensor(prompts([PROMPT]))
    plain = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    rhf.enable(model, SPARSE.with_(active_ratio=1.0), backend="torch")
    got = resa_generate(model, ids, model.resa_config)
    assert torch.equal(got, plain)


@pytest.mark.parametrize("arch,variant", [("llama", "paper"), ("llama", "fused"), ("mistral", "paper"),
                                          ("qwen2", "fused"), ("qwen3", "paper")])
def test_resa_equals_our_engine(arch, variant):
    model = rhf.enable(hf_model(arch), backend="torch")
    rows = prompts([PROMPT])
    resa = SPARSE.with_(rectify_variant=variant)
    ours = our_engine(model).generate_ids(rows, resa=resa, max_new_tokens=NEW, eos_token_ids=[])
    out = resa_generate(model, torch.tensor(rows), resa, return_dict_in_generate=True)
    assert out.sequences[0, PROMPT:].tolist() == ours.token_ids[0]
    assert cache_of(out).stats.rectifications == ours.stats.rectifications > 0


def test_left_padded_batch_equals_our_engine(llama):
    rows = prompts([PROMPT, 211])
    ids, mask = left_padded(rows)
    for variant in ("paper", "fused"):
        resa = SPARSE.with_(rectify_variant=variant)
        ours = our_engine(llama).generate_ids(rows, resa=resa, max_new_tokens=NEW, eos_token_ids=[])
        got = resa_generate(llama, ids, resa, attention_mask=mask)
        assert got[:, ids.shape[1]:].tolist() == ours.token_ids, variant


def test_sparse_differs_from_dense(llama):
    ids = torch.tensor(prompts([PROMPT]))
    dense = resa_generate(llama, ids, SPARSE.with_(active_ratio=1.0))
    for resa in (SPARSE.with_(mode="sparse"), SPARSE):
        assert not torch.equal(resa_generate(llama, ids, resa), dense)


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_rectification_cadence_and_cache_equals_dense(llama, variant):
    f = SPARSE.rectify_every
    resa = SPARSE.with_(rectify_variant=variant)
    ids = torch.tensor(prompts([PROMPT]))
    out = resa_generate(llama, ids, resa, return_dict_in_generate=True)
    stats = cache_of(out).stats
    # Token t is sampled at loop step t; NEW tokens means steps 0 .. NEW-1, the last one never fed.
    if variant == "paper":
        expect_t = [t for t in range(1, NEW - 1) if t % f == 0]
        expect = [(t, PROMPT + t - f, f) for t in expect_t]
    else:
        expect_t = [t for t in range(NEW - 1) if t % f == f - 1]
        expect = [(t, PROMPT + t - f + 1, f) for t in expect_t]
    assert stats.rectified_at == expect
    assert stats.rectifications == len(expect) and stats.decode_steps == NEW - 1
    assert stats.sparse_steps == NEW - 1 - (len(expect) if variant == "fused" else 0)

    # Every rectified window was computed from dense K/V before it, so all K/V up to the end of the
    # last window equal a dense forward over the same tokens; the tokens after it are sparse-made.
    cache = cache_of(out)
    _, w_start, width = expect[-1]
    dense_upto = w_start + width
    seq = out.sequences[:, :dense_upto]
    ref = llama(seq, use_cache=True, return_dict=True)
    ref_cache = getattr(ref, "cache", None) or ref.past_key_values
    for layer in range(llama.config.num_hidden_layers):
        k, v, kmin, kmax = cache.layer(layer)
        rk, rv = ref_cache.layers[layer].keys, ref_cache.layers[layer].values
        assert_close(k[:, :, :dense_upto], rk, None, floor=1e-5, what=f"K layer {layer}")
        assert_close(v[:, :, :dense_upto], rv, None, floor=1e-5, what=f"V layer {layer}")
        n = cache.lengths[0]
        smin, smax = block_summaries_ref(k[:, :, :n], torch.tensor([n]), resa.block_size)
        nb = smin.shape[2]
        assert torch.equal(kmin[:, :, :nb], smin) and torch.equal(kmax[:, :, :nb], smax)
    # The tokens after the last window were written by sparse steps: without a rectification
    # their K/V differ from dense, so the equality above is not trivially true.
    late = llama(out.sequences[:, :cache.lengths[0]], use_cache=True, return_dict=True)
    late_cache = getattr(late, "cache", None) or late.past_key_values
    diff = (late_cache.layers[1].keys[:, :, dense_upto:] - cache.layer(1)[0][:, :, dense_upto:cache.lengths[0]])
    assert diff.abs().max() > 1e-3


def test_sampling_and_processors_match_transformers():
    model = hf_model("qwen2")
    ids, mask = left_padded(prompts([120, 97]))
    settings = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3,
                    max_new_tokens=24, eos_token_id=5, pad_token_id=PAD, attention_mask=mask)
    torch.manual_seed(123)
    plain = model.generate(ids, **settings)
    rhf.enable(model, SPARSE.with_(active_ratio=1.0), backend="torch")
    torch.manual_seed(123)
    got = model.generate(ids, custom_generate=rhf.generate, **settings)
    assert torch.equal(got, plain)


def test_eos_and_stopping_criteria(llama):
    ids = torch.tensor(prompts([PROMPT]))
    free = resa_generate(llama, ids, SPARSE)[0, PROMPT:].tolist()
    eos = free[5]
    stopped = llama.generate(ids, custom_generate=rhf.generate, max_new_tokens=NEW, do_sample=False,
                             eos_token_id=eos, pad_token_id=PAD)
    assert stopped[0, PROMPT:].tolist() == free[:free.index(eos) + 1]

    class StopAfter(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= PROMPT + 11, dtype=torch.bool)

    got = resa_generate(llama, ids, SPARSE, stopping_criteria=transformers.StoppingCriteriaList([StopAfter()]))
    assert got[0, PROMPT:].tolist() == free[:11]


def test_likelihood_forward_stays_dense(llama):
    ids = torch.tensor(prompts([64, 64]))
    got = llama(ids).logits
    rhf.disable(llama)
    try:
        ref = llama(ids).logits
    finally:
        rhf.enable(llama, SPARSE, backend="torch")
    assert_close(got, ref, None, what="logits")


def test_dynamic_cache_grows_and_static_refuses():
    model = hf_model("llama")
    cache = rhf.ResaCache.for_model(model, batch=1, block_size=4, capacity=8)
    from resa.cache import Span

    k = torch.randn(1, 2, 20, 16)
    cache.begin(rhf.ResaPass(Span.make([0], [20], 20, "cpu"), None))
    for layer in range(2):
        cache.update(k, k, layer)
    cache.end()
    assert cache.capacity >= 20 and cache.lengths == [20]
    smin, smax = block_summaries_ref(k, torch.tensor([20]), 4)
    assert torch.equal(cache.layer(1)[2][:, :, :5], smin)
    static = rhf.ResaCache.for_model(model, batch=1, block_size=4, capacity=8, static=True)
    with pytest.raises(ValueError, match="static"):
        static.begin(rhf.ResaPass(Span.make([0], [20], 20, "cpu"), None))
    with pytest.raises(RuntimeError, match="custom_generate"):
        static.update(k, k, 0)


def test_unsupported_models_fail_clearly():
    with pytest.raises(rhf.UnsupportedModelError, match="sliding-window"):
        cfg = _config("mistral")
        cfg.sliding_window = 128
        rhf.check_model(types.SimpleNamespace(config=cfg))
    qcfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=96, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                    use_sliding_window=True, sliding_window=64, max_window_layers=0)
    with pytest.raises(rhf.UnsupportedModelError, match="sliding"):
        rhf.check_model(types.SimpleNamespace(config=qcfg))
    gcfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)
    with pytest.raises(rhf.UnsupportedModelError, match="model types"):
        rhf.enable(transformers.GPT2LMHeadModel(gcfg))
    soft = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama", attn_logit_softcapping=50.0))
    with pytest.raises(rhf.UnsupportedModelError, match="soft-capped"):
        rhf.check_model(soft)
    plain = hf_model("llama")
    with pytest.raises(ValueError, match="enable"):
        plain.generate(torch.tensor(prompts([20])), custom_generate=rhf.generate, max_new_tokens=2)


@pytest.mark.slow
def test_default_model_resa_equals_our_engine():
    """SmolLM2-135M (GGUF) through transformers + resa.hf gives our engine's tokens, default
    ReSA settings but f = 8, both rectification variants, on a prompt long enough to be sparse."""
    pytest.importorskip("gguf")
    from resa.default_model import default_model_path

    try:
        path = default_model_path()
    except Exception as exc:  # the model package is optional
        pytest.skip(str(exc))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    from resa.loader import load_checkpoint

    ckpt = load_checkpoint(path)
    # Our model gets transformers' dequantized tensors, so both run on exactly the same weights.
    ours_model = Transformer(ckpt.config, backend="torch")
    ours_model.load_weights(dict(model.state_dict()))
    engine = Engine(ours_model.eval(), ckpt.tokenizer)
    text = " ".join(f"Item {i} of the list is the number {i * 7 % 101}." for i in range(45))
    rows = [engine.tokenizer.encode(text + " Repeat item 17 of the list:")]
    assert len(rows[0]) > 512  # over 2x the 256 tokens below which the defaults stay dense
    rhf.enable(model, backend="torch")
    for variant in ("paper", "fused"):
        resa = ResaConfig(rectify_every=8, rectify_variant=variant)
        ours = engine.generate_ids(rows, resa=resa, max_new_tokens=24, eos_token_ids=[])
        out = model.generate(torch.tensor(rows), custom_generate=rhf.generate, resa_config=resa,
                             max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=model.config.pad_token_id or 0, return_dict_in_generate=True)
        assert out.sequences[0, len(rows[0]):].tolist() == ours.token_ids[0], variant
        assert cache_of(out).stats.rectifications == ours.stats.rectifications == 2
