"""Retrieval and GSM8K evaluation pieces: sample generation, scoring, shared-prefill decoding."""

from __future__ import annotations

import re

import pytest
import torch

from resa.config import ResaConfig
from resa.eval import gsm8k, retrieval, ruler
from resa.eval.data import BUILTIN_SAMPLE
from resa.eval.decode import greedy_from
from resa.eval.stats import stratified_bootstrap
from resa.eval.store import RunStore
from tests.tiny import random_prompts, tiny_engine


class WordTokenizer:
    """One token per whitespace-separated word (ids mod 97), enough to size prompts."""

    eos_token_ids = ()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return [sum(w.encode()) % 97 for w in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


WORDS = sorted(set(re.findall(r"[a-z]{4,10}", BUILTIN_SAMPLE))) + [f"word{c}{d}" for c in "abcdefgh" for d in "xyz"]


def _maker(length: int = 400) -> ruler.SampleMaker:
    tok = WordTokenizer()
    return ruler.SampleMaker(tok, ruler.Haystack(tok, [BUILTIN_SAMPLE * 4]), WORDS, length, chat=False, seed=3)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_lands_at_requested_depth(depth):
    sentences = [f"Sentence number {i} of the haystack." for i in range(40)]
    counts = [5] * 40
    out = ruler.insert_at_depths(sentences, counts, ["NEEDLE"], [depth])
    assert out.count("NEEDLE") == 1 and len(out) == 41
    assert out.index("NEEDLE") / 40 == pytest.approx(depth, abs=1 / 40)


def test_single_needle_sample_depth_answer_and_length():
    mk = _maker()
    for index in (0, 5, 10):
        s = mk.sample("single", index, ruler.MAX_NEW["single"])
        assert s.depths == [index / 10]
        assert len(s.ids) <= 400 - ruler.MAX_NEW["single"] and len(s.ids) > 300
        value = s.answers[0]
        assert re.fullmatch(r"\d{7}", value) and s.text.count(value) == 1
        key = re.search(r"for (\S+) mentioned", s.text).group(1)
        needle = f"One of the special magic numbers for {key} is: {value}."
        body = s.text.split("\n", 1)[1].rsplit("\n\n", 1)[0]
        assert body.index(needle) / len(body) == pytest.approx(index / 10, abs=0.08)
    again = _maker().sample("single", 5, 16)
    assert again.ids == mk.sample("single", 5, 16).ids


def test_multi_needle_tasks_are_recoverable_from_the_text():
    mk = _maker(600)
    mv = mk.sample("multivalue", 1, 48)
    assert len(set(mv.answers)) == 4 and all(mv.text.count(a) == 1 for a in mv.answers)
    mkey = mk.sample("multikey", 2, 16)
    assert len(re.findall(r"special magic numbers for \S+ is: \d{7}\.", mkey.text)) == 4
    key = re.search(r"number for (\S+) mentioned", mkey.text).group(1)
    assert f"for {key} is: {mkey.answers[0]}." in mkey.text
    vt = mk.sample("vt", 0, 32)
    value = re.search(r"assigned the value (\d+)", vt.text).group(1)
    chain, holders = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", vt.text)), {value}
    for _ in range(6):
        holders |= {k for k, v in chain.items() if v in holders or v.removeprefix("VAR ") in holders}
    assert sorted(holders - {value}) == sorted(vt.answers)


def test_cwe_common_words_are_the_most_frequent():
    s = _maker(2500).sample("cwe", 0, 48)
    listed = re.findall(r"^\d+\. (\S+)$", s.text, flags=re.M)
    counts = {w: listed.count(w) for w in set(listed)}
    assert len(s.answers) == 10
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_recall_scores_whole_words():
    assert ruler.recall("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert ruler.recall("12345678", ["1234567"]) == 0.0
    assert ruler.recall("they are: ABCDE, FGHIJ", ["abcde", "fghij"]) == 1.0
    assert not ruler.matches("a wordsmith", "word")


def test_gsm8k_answer_parsing():
    assert gsm8k.reference("so 2 * 600 = 1,200\n#### 1,200") == "1200"
    assert gsm8k.extract("5 + 3 = 8 apples. The answer is 8.") == "8"
    assert gsm8k.extract("She pays $1,200 in total. The answer is $1,200.") == "1200"
    assert gsm8k.extract("It is 3 then 4 then 12") == "12"
    assert gsm8k.extract("no idea") is None
    assert gsm8k.extract("It shrinks by \\(\\boxed{8}\\) cm from 1:00 PM to 5:00 PM.") == "8"
    assert gsm8k.extract("From 1:00 PM to 5:00 PM") == "5"  # not "00"
    assert gsm8k.extract("The answer is 3. Check: \\boxed{\\$1,250.5}") == "1250.5"  # the last final marker
    assert gsm8k.extract("so -4 degrees. The answer is -4.") == "-4"
    assert gsm8k.same_number("18.0", "18") and not gsm8k.same_number("17", "18")
    w = gsm8k.worked("Janet sells 16 - 3 = <<16-3=13>>13 eggs.\n#### 13")
    assert "<<" not in w and w.endswith("The answer is 13.")


def test_gsm8k_batches_group_similar_lengths():
    batches = gsm8k.equal_length_batches([30, 10, 20, 10, 50], 2)
    assert batches == [[1, 3], [2, 0], [4]]


def test_stratified_bootstrap_is_the_macro_average():
    m, lo, hi = stratified_bootstrap([[1, 1, 0, 1], [0, 0]])
    assert m == pytest.approx(0.375) and lo <= m <= hi


def _prefilled(engine, prompts, extra):
    runner = engine.open(len(prompts), max(map(len, prompts)) + extra, 4)
    return runner, runner.extend(prompts, 32)


def test_resa_with_full_budget_decodes_exactly_like_dense():
    engine = tiny_engine()
    prompts = random_prompts([70, 45, 90])
    cache, logits = _prefilled(engine, prompts, 40)
    base = dict(block_size=4, min_blocks=2, rectify_every=8)
    dense = greedy_from(engine, cache.fork(), logits, ResaConfig(mode="dense", **base), 40, [])
    full = greedy_from(engine, cache.fork(), logits, ResaConfig(active_ratio=1.0, **base), 40, [])
    sparse = greedy_from(engine, cache.fork(), logits, ResaConfig(active_ratio=0.1, **base), 40, [])
    assert full == dense and all(len(o) == 40 for o in dense)
    assert sparse != dense  # the tiny model's attention is peaked: a 10% budget changes its output


def test_stacked_rows_decode_like_each_row_alone():
    engine = tiny_engine()
    prefix, suffixes = random_prompts([50])[0], random_prompts([7, 3], seed=5)
    base = engine.open(1, 80, 4)
    base.extend([prefix], 16)
    rows, first = [], []
    for sfx in suffixes:
        r = base.fork()
        first.append(r.extend([sfx], 16))
        rows.append(r)
    cfg = ResaConfig(block_size=4, min_blocks=2, active_ratio=0.3, rectify_every=8)
    stacked = engine.open(len(rows), 80, 4)
    stacked.load_rows(rows)
    together = greedy_from(engine, stacked, torch.cat(first), cfg, 16, [])
    for i, sfx in enumerate(suffixes):
        cache, logits = _prefilled(engine, [prefix + sfx], 20)
        alone = greedy_from(engine, cache, logits, cfg, 16, [])
        assert alone[0] == together[i]


def test_retrieval_run_scores_resumes_and_full_budget_matches_dense(tmp_path):
    engine = tiny_engine()
    engine.tokenizer = WordTokenizer()
    s = retrieval.RetrievalSettings(length=160, tasks=("single", "vt"), samples=3, batch=2, ratios=(1.0,),
                                    haystack="sample", words="sample", chat=False, block_size=4, min_blocks=2)
    store = RunStore(tmp_path, "r", "retrieval", retrieval.settings_dict(s), {})
    retrieval.run(engine, store, s, progress=False)
    assert sorted(store.cells()) == ["single/b0", "single/b1", "vt/b0", "vt/b1"]
    for cell in store.cells().values():
        assert [o["text"] for o in cell["outputs"]["dense"]] == [o["text"] for o in cell["outputs"]["resa/r1.0"]]
    summ = retrieval.summarize(store.cells(), store.data["settings"])
    assert summ["tasks"]["single"]["resa/r1.0"]["n"] == 3
    assert summ["average"]["resa/r1.0"]["diff"][0] == 0.0

    class Boom:
        tokenizer = WordTokenizer()

        def __getattr__(self, name):
            raise AssertionError("a finished run must not touch the model")

    retrieval.run(Boom(), RunStore(tmp_path, "r", "retrieval", retrieval.settings_dict(s), {}), s, progress=False)
