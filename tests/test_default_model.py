"""The real default model (SmolLM2-135M-Instruct GGUF) end to end. Slow: run with `-m slow`."""

import pytest

from resa.config import ResaConfig
from resa.errors import LoaderError

pytestmark = pytest.mark.slow

PROMPT = "What is the capital of France? Answer in one short sentence."


@pytest.fixture(scope="module")
def engine():
    from resa.engine import Engine

    try:
        return Engine.load()
    except LoaderError as exc:
        pytest.skip(str(exc))


def _run(engine, **cfg):
    return engine.generate([PROMPT], chat=True, resa=ResaConfig(**cfg), max_new_tokens=24)


def test_dense_and_resa_answer_sensibly(engine):
    for cfg in (dict(mode="dense"), dict(mode="resa"), dict(mode="resa", rectify_variant="fused")):
        out = _run(engine, **cfg)
        assert "Paris" in out.texts[0], (cfg, out.texts[0])


def test_active_ratio_one_matches_dense(engine):
    dense = _run(engine, mode="dense")
    assert _run(engine, mode="resa", active_ratio=1.0).token_ids == dense.token_ids


def test_long_prompt_sparse_steps_stay_coherent(engine):
    """A prompt of ~1.5K tokens makes decoding really sparse (16 blocks of 16 = 256 dense tokens)."""
    story = " ".join(f"Line {i}: the keeper counted {i * 7 % 13} lanterns." for i in range(120))
    prompt = story + " Line 120: the keeper"
    dense = engine.generate([prompt], resa=ResaConfig(mode="dense"), max_new_tokens=40)
    resa = engine.generate([prompt], resa=ResaConfig(mode="resa", rectify_every=8), max_new_tokens=40)
    assert resa.stats.kv_read_fraction < 0.5 and resa.stats.rectifications == 4
    for text in (dense.texts[0], resa.texts[0]):
        assert "counted" in text and "Line 121" in text, (dense.texts, resa.texts)
