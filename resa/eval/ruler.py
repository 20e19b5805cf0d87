"""RULER-style retrieval samples built locally: needles hidden in a haystack of real text.

Five tasks, after RULER's definitions (Hsieh et al., 2024), with the Paul Graham essays as haystack:
- single:     one needle "One of the special magic numbers for {key} is: {value}."; recall its value.
- multikey:   four needles with different keys; recall the value of one of them (the rest distract).
- multivalue: four needles with the same key and different values; recall all four.
- vt:         variable tracking: "VAR A = 12345." then "VAR B = VAR A." ... (a chain of 5
              variables, in order at increasing depths); name every variable holding the value.
- cwe:        common-word extraction: a numbered list of words where 10 words occur often and the
              rest rarely; name the 10 frequent ones (this one has no essay haystack).
Each sample is a token sequence of at most `length - max_new` tokens (chat template included) and
its expected answers. Score = the fraction of expected answers found in the model's output as whole
words (case-insensitive), RULER's "string match all"; for single and multikey that is 0 or 1.
Everything is drawn from `random.Random(seed, task, index)`, so samples are reproducible.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from random import Random
from typing import Sequence

TASKS = ("single", "multikey", "multivalue", "vt", "cwe")

# Answer tokens to generate per task (enough for the expected answers plus separators).
MAX_NEW = {"single": 16, "multikey": 16, "multivalue": 48, "vt": 32, "cwe": 48}

_NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
               "it. I will quiz you about the numbers afterwards.\n")
_VT_INTRO = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
_CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n")


@dataclass(frozen=True)
class Sample:
    """One retrieval sample: prompt token ids, the expected answers, and where the needles sit.
    depths: relative position (0 = start, 1 = end of the haystack) of each needle's insertion."""

    task: str
    index: int
    ids: list[int]
    answers: list[str]
    depths: list[float] = field(default_factory=list)
    text: str = ""


def split_sentences(docs: Sequence[str]) -> list[str]:
    """Sentences of the documents (split after . ! ? and at blank lines), whitespace-normalised."""
    out = []
    for d in docs:
        for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", d):
            s = " ".join(s.split())
            if s:
                out.append(s)
    return out


def vocabulary(docs: Sequence[str], limit: int = 5000) -> list[str]:
    """Distinct lowercase alphabetic words of 4-10 letters from the documents, sorted."""
    words = set()
    for d in docs:
        words.update(w for w in re.findall(r"[A-Za-z]+", d) if 4 <= len(w) <= 10 and w.islower())
        if len(words) >= limit * 4:
            break
    return sorted(words)[: limit * 4][::4] if len(words) > limit else sorted(words)


class Haystack:
    """Sentences of a corpus with their token counts, to cut windows of a given token length."""

    def __init__(self, tokenizer, docs: Sequence[str]) -> None:
        self.sentences = split_sentences(docs)
        if not self.sentences:
            raise ValueError("the haystack corpus has no text")
        self.counts = [len(tokenizer.encode(" " + s, add_bos=False)) for s in self.sentences]

    def window(self, rng: Random, tokens: int) -> tuple[list[str], list[int]]:
        """Consecutive sentences (wrapping around the corpus) from a random start, at most about
        `tokens` long, and their token counts."""
        i = rng.randrange(len(self.sentences))
        out, counts, total = [], [], 0
        while True:
            j = i % len(self.sentences)
            if total + self.counts[j] > tokens and out:
                break
            out.append(self.sentences[j])
            counts.append(self.counts[j])
            total += self.counts[j]
            i += 1
        return out, counts


def insert_at_depths(sentences: list[str], counts: Sequence[int], needles: Sequence[str],
                     depths: Sequence[float]) -> list[str]:
    """Insert each needle between sentences at the boundary nearest to its depth (fraction of the
    window's tokens before it). Needles keep their order when depths are sorted."""
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    slots = []
    for d in depths:
        target = d * cum[-1]
        k = bisect.bisect_left(cum, target)
        if k > 0 and (k == len(cum) or target - cum[k - 1] <= cum[k] - target):
            k -= 1
        slots.append(k)
    out = list(sentences)
    for k, needle in sorted(zip(slots, needles), key=lambda p: p[0], reverse=True):
        out.insert(k, needle)
    return out


def _number(rng: Random, used: set) -> str:
    while True:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in used:
            used.add(v)
            return v


def _key(rng: Random, words: Sequence[str], used: set) -> str:
    while True:
        k = f"{rng.choice(words)}-{rng.choice(words)}"
        if k not in used:
            used.add(k)
            return k


def _var(rng: Random, used: set) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in used:
            used.add(v)
            return v


class SampleMaker:
    """Builds samples of one length for one tokenizer; `chat` wraps the request in the model's
    chat template and starts the assistant turn with the task's answer prefix."""

    def __init__(self, tokenizer, haystack: Haystack, words: Sequence[str], length: int,
                 chat: bool = True, seed: int = 0) -> None:
        if len(words) < 12:
            raise ValueError("the word list needs at least 12 words (10 frequent ones for cwe, and keys)")
        self.tok, self.hay, self.words = tokenizer, haystack, list(words)
        self.length, self.chat, self.seed = length, chat, seed

    def encode(self, user: str, answer_prefix: str) -> list[int]:
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": user}]) + answer_prefix
            return self.tok.encode(text)
        return self.tok.encode(user + "\n" + answer_prefix)

    def _text(self, task: str, index: int, rng: Random, budget: int) -> tuple[str, str, list[str], list[float]]:
        """(user message, answer prefix, answers, depths) with a haystack of about `budget` tokens."""
        if task == "cwe":
            return self._cwe(rng, budget)
        used_n, used_k = set(), set()
        if task in ("single", "multikey", "multivalue"):
            key = _key(rng, self.words, used_k)
            if task == "single":
                needles, answers = [(key, _number(rng, used_n))], None
            elif task == "multikey":
                needles = [(key, _number(rng, used_n))] + [(_key(rng, self.words, used_k), _number(rng, used_n))
                                                           for _ in range(3)]
                rng.shuffle(needles)
            else:
                needles = [(key, _number(rng, used_n)) for _ in range(4)]
            answers = [v for k, v in needles if k == key]
            texts = [f"One of the special magic numbers for {k} is: {v}." for k, v in needles]
            # The single needle walks a grid of depths (0, 0.1, .., 1) over the samples, as in RULER.
            depths = [(index % 11) / 10] if task == "single" else [rng.random() for _ in texts]
            if task == "multivalue":
                question = (f"What are all the special magic numbers for {key} mentioned in the provided text?")
                prefix = f"The special magic numbers for {key} mentioned in the provided text are"
            else:
                question = f"What is the special magic number for {key} mentioned in the provided text?"
                prefix = f"The special magic number for {key} mentioned in the provided text is"
            intro = _NIAH_INTRO
        elif task == "vt":
            value = str(rng.randint(10_000, 99_999))
            used_v: set = set()
            names = [_var(rng, used_v) for _ in range(5)]
            texts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            depths = sorted(rng.random() for _ in texts)
            answers = names
            question = (f"Question: Find all variables that are assigned the value {value} in the text above.")
            prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
                      f"{len(names)} variables are assigned the value {value}, they are:")
            intro = _VT_INTRO
        else:
            raise ValueError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")
        window, counts = self.hay.window(rng, budget)
        body = " ".join(insert_at_depths(window, counts, texts, depths))
        user = f"{intro}{body}\n\n{question}"
        return user, prefix, answers, depths

    def _cwe(self, rng: Random, budget: int) -> tuple[str, str, list[str], list[float]]:
        if budget >= 2000:
            freq_common, freq_rare, n_common = 30, 3, 10  # RULER's setting
        else:  # short smoke-test prompts: fewer, less frequent common words
            freq_common, freq_rare, n_common = 3, 1, 5
        pool = rng.sample(self.words, len(self.words))
        common = pool[:n_common]
        # A listed word costs its tokens plus its number: about 4 tokens on these tokenizers.
        n_rare = max(1, min(len(pool) - n_common, (budget - 4 * freq_common * n_common) // (4 * freq_rare)))
        rare = pool[n_common:n_common + n_rare]
        items = common * freq_common + rare * freq_rare
        rng.shuffle(items)
        body = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        user = f"{_CWE_INTRO}{body}\nQuestion: What are the {n_common} most common words in the above list?"
        prefix = f"Answer: The top {n_common} words that appear most often in the list are:"
        return user, prefix, common, []

    def sample(self, task: str, index: int, max_new: int) -> Sample:
        """Sample `index` of `task`: a prompt of at most length - max_new tokens."""
        rng_seed = f"{self.seed}/{task}/{index}/{self.length}"
        target = self.length - max_new
        budget, best = target - 200, None
        for _ in range(6):
            user, prefix, answers, depths = self._text(task, index, Random(rng_seed), budget)
            ids = self.encode(user, prefix)
            if len(ids) <= target:
                if best is None or len(ids) > len(best.ids):
                    best = Sample(task, index, ids, answers, depths, user)
                if target - len(ids) <= max(32, target // 50):
                    break
                budget += (target - len(ids)) * 9 // 10
            else:
                budget -= len(ids) - target + 16
        if best is None:
            raise ValueError(f"could not fit a {task} sample into {target} tokens")
        return best


def matches(prediction: str, answer: str) -> bool:
    """Whether `answer` occurs in `prediction` as a whole word (case-insensitive)."""
    return re.search(r"(?<!\w)" + re.escape(answer.lower()) + r"(?!\w)", prediction.lower()) is not None


def recall(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of the expected answers found in the prediction (RULER's string match all)."""
    return sum(matches(prediction, a) for a in answers) / len(answers)
