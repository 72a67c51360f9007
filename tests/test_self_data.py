"""Training text the base writes itself (`mtp self-data`): greedy continuations of corpus prompts,
written as a prepared dataset that finetuning reads."""

from __future__ import annotations

import numpy as np
import pytest

from mtp import generate_reference, load_model
from mtp.data import DataError, TokenData
from mtp.self_data import corpus_prompts, write_self_data


def test_corpus_prompts_stay_inside_one_document(corpus):
    data = TokenData(corpus, "train")
    prompts = corpus_prompts(data, 200, 40, seed=5)
    assert prompts == corpus_prompts(data, 200, 40, seed=5) != corpus_prompts(data, 200, 40, seed=6)
    assert all(1 <= len(p) <= 40 for p in prompts)
    assert all(data.eos_id not in p or p == [data.eos_id] for p in prompts)
    with pytest.raises(DataError):
        corpus_prompts(data, 0, 40)


@pytest.mark.parametrize("keep_corpus", [False, True])
def test_self_data_is_prompts_and_the_bases_greedy_continuations(corpus, tiny_run, tmp_path, keep_corpus):
    model, _ = load_model(tiny_run)
    out = tmp_path / "self"
    meta = write_self_data(model, corpus, out, prompts=5, prompt_len=12, new_tokens=9, batch_size=2, seed=3,
                           keep_corpus=keep_corpus, base=str(tiny_run))
    src = TokenData(corpus, "train")
    expected: list[int] = []
    generated = 0
    for p in corpus_prompts(src, 5, 12, seed=3):
        cont = generate_reference(model, [p], 9, stop_tokens=(src.eos_id,)).tokens[0]
        expected += p + cont + ([] if cont and cont[-1] == src.eos_id else [src.eos_id])
        generated += len(cont)
    got = TokenData(out, "train")
    assert got.tokens[: len(expected)].tolist() == expected
    if keep_corpus:
        assert got.tokens[len(expected):].tolist() == src.tokens.tolist()
    else:
        assert len(got.tokens) == len(expected)
    assert np.array_equal(TokenData(out, "val").tokens, TokenData(corpus, "val").tokens)
    assert meta["self_data"]["generated_tokens"] == generated > 0
    assert (out / "tokenizer.json").read_text() == (corpus / "tokenizer.json").read_text()


def test_self_data_refuses_another_tokenizer(corpus, tiny_run, tmp_path):
    model, _ = load_model(tiny_run)
    model.cfg.vocab_size = 100  # as if the model had a smaller vocabulary than the corpus
    with pytest.raises(DataError, match="wrong tokenizer"):
        write_self_data(model, corpus, tmp_path / "x", prompts=1)
    assert not (tmp_path / "x").exists()
