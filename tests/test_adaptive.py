"""rectify_every="auto" (docs/method.md section 8): f moves with the agreement the rectification
pass measures, every sparse-made token is still rectified exactly once, and bad settings are
clear errors."""

import pytest

from resa.config import ConfigError, ResaConfig
from tests.tiny import random_prompts, tiny_engine

PROMPTS = random_prompts([300, 123])


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def _gen(engine, **cfg):
    resa = ResaConfig(**{**dict(block_size=4, min_blocks=4, rectify_every="auto", rectify_min=4, rectify_max=32),
                         **cfg})
    return engine.generate_ids(PROMPTS, resa=resa, max_new_tokens=120, eos_token_ids=[])


def _covered_once(stats, variant):
    """Windows are contiguous: each starts where the previous one ended (both variants: a fused
    window's newest token is its own dense-fed one)."""
    at = stats.rectified_at
    assert at and at[0][1] == len(PROMPTS[0])  # the first window starts at generated token 0
    for (t0, p0, w0), (t1, p1, w1) in zip(at, at[1:]):
        assert p1 == p0 + w0, (at,)


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_f_grows_when_sparse_agrees_and_shrinks_when_not(engine, variant):
    high = _gen(engine, active_ratio=0.9, rectify_variant=variant)
    low = _gen(engine, active_ratio=0.05, rectify_variant=variant)
    hw = [w for _, _, w in high.stats.rectified_at]
    lw = [w for _, _, w in low.stats.rectified_at]
    assert hw[0] == lw[0] == 32  # the start: the paper's f
    assert max(high.stats.rectify_agreement) >= 0.95 and hw[-1] == 32
    assert min(low.stats.rectify_agreement) < 0.8 and lw[-1] < 32
    # Fewer rectifications where the drafts agree.
    assert len(hw) < len(lw)
    for out in (high, low):
        _covered_once(out.stats, variant)
        assert len(out.stats.rectify_agreement) == out.stats.rectifications
    assert "f_auto=" in low.stats.summary()


def test_low_agreement_reaches_the_lower_bound(engine):
    out = _gen(engine, active_ratio=0.05, rectify_min=8)
    widths = [w for _, _, w in out.stats.rectified_at]
    assert widths[:3] == [32, 16, 8] and min(widths) == 8


def test_auto_settings():
    cfg = ResaConfig(rectify_every="auto")
    assert cfg.rectify_auto and cfg.rectify_every == 32 and cfg.rectifies
    for bad in (dict(rectify_min=1), dict(rectify_min=16, rectify_max=8), dict(rectify_max=4096),
                dict(rectify_auto="yes"), dict(rectify_every="often")):
        with pytest.raises(ConfigError):
            ResaConfig(**bad)


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_growth_from_a_short_start_keeps_windows_contiguous(engine, variant):
    out = _gen(engine, active_ratio=0.9, rectify_variant=variant, rectify_every=4, rectify_auto=True)
    widths = [w for _, _, w in out.stats.rectified_at]
    assert widths[:2] == [4, 8]  # grows after the first window
    _covered_once(out.stats, variant)


def test_drift_eval_modes_for_auto_and_verify():
    from resa.eval.drift import DriftSettings

    s = DriftSettings(modes=("dense", "resa-auto", "verify"))
    assert s.resa("resa-auto").rectify_auto and s.resa("resa-auto").mode == "resa"
    assert s.resa("verify").mode == "verify" and s.resa("verify").active_ratio == s.ratio
    with pytest.raises(ValueError, match="unknown drift modes"):
        DriftSettings(modes=("verified",))
