"""The lm-eval model "resa" runs a tiny generation task end to end, offline: the task file, its
data, the model and its tokenizer are all written by the test."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

import resa.hf as rhf  # noqa: E402
from resa.config import ResaConfig  # noqa: E402
from tests.hf_models import hf_model  # noqa: E402

WORDS = [f"w{i}" for i in range(94)]  # ids 0..93; 94 <unk>, 95 <eos>, 96 <pad> (tiny vocab of 97)
PROMPT_WORDS = 260  # 65 blocks of 4: sparse with min_blocks 4
TASK = "resa_tiny_gen"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {w: i for i, w in enumerate(WORDS)} | {"<unk>": 94, "<eos>": 95, "<pad>": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word pieces with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = hf_model("llama")
    model.config.eos_token_id = 95
    model.generation_config.eos_token_id = 95
    model.generation_config.pad_token_id = 96
    model.save_pretrained(root / "model")
    _tokenizer().save_pretrained(root / "model")
    g = torch.Generator().manual_seed(3)
    with open(root / "data.jsonl", "w") as fh:
        for i in range(2):
            ids = torch.randint(0, len(WORDS), (PROMPT_WORDS - 40 * i,), generator=g).tolist()
            fh.write(json.dumps({"text": " ".join(WORDS[j] for j in ids), "answer": "w1"}) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{text}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['<eos>']\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


def _run(workdir, **resa_args):
    from lm_eval.tasks import TaskManager

    import resa.hf.lm_eval as rle

    args = dict(pretrained=str(workdir / "model"), dtype="float32", device="cpu", batch_size=2,
                block_size=4, min_blocks=4, rectify_every=8, attention_backend="torch") | resa_args
    out = rle.evaluate(args, [TASK], task_manager=TaskManager(include_path=str(workdir / "tasks"), include_defaults=False),
                       log_samples=True, limit=None)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out, [s["resps"][0][0] for s in samples], [s["doc"]["text"] for s in samples]


def test_lm_eval_generation_task_runs_with_resa(workdir):
    out, resa_texts, contexts = _run(workdir, active_ratio=0.1, rectify_variant="fused")
    assert "exact_match,none" in out["results"][TASK]
    assert len(resa_texts) == 2 and all(t.strip() for t in resa_texts)
    _, dense_texts, _ = _run(workdir, active_ratio=1.0)
    assert resa_texts != dense_texts  # generation went through sparse attention

    # The dense lm-eval answers equal transformers' own greedy generation on the same contexts.
    tok = transformers.AutoTokenizer.from_pretrained(workdir / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    for ctx, text in zip(contexts, dense_texts):
        ids = tok(ctx, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=96, eos_token_id=95)
        assert tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).split() == text.split()


def test_lm_eval_likelihood_is_dense(workdir):
    import resa.hf.lm_eval as rle

    lm = rle.register()(pretrained=str(workdir / "model"), dtype="float32", device="cpu",
                        block_size=4, min_blocks=4, attention_backend="torch")
    assert lm.resa_config == ResaConfig(block_size=4, min_blocks=4)
    ids = torch.randint(0, len(WORDS), (2, 300), generator=torch.Generator().manual_seed(5))
    got = lm._model_call(ids)
    rhf.disable(lm.model)
    assert torch.allclose(got, lm._model_call(ids), atol=1e-5, rtol=0)
