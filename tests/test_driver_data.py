"""Driver data: synthetic corpus, JSONL loading (line-numbered errors), encoding, batching."""
from __future__ import annotations

import json

import pytest
import torch

from repforget_kernels.driver.data import (
    DOMAINS,
    SPLITS,
    DataError,
    encode,
    iterate_batches,
    load_jsonl,
    make_corpus,
)
from repforget_kernels.driver.models import build_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(0)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_tokenizer(corpus)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class TestCorpus:
    def test_deterministic_per_seed(self, corpus):
        assert make_corpus(0) == corpus
        assert make_corpus(1) != corpus

    def test_split_sizes_and_fields(self, corpus):
        assert set(corpus) == set(SPLITS)
        assert [len(corpus[s]) for s in ("forget", "retain", "holdout")] == [30, 60, 30]
        assert len(corpus["probe"]) == 24
        for items in corpus.values():
            for item in items:
                assert set(item) == {"prompt", "answer", "domain"}
                assert item["domain"] in DOMAINS
                assert item["prompt"].startswith("Q: ") and item["prompt"].endswith(" A:")
                assert item["answer"].strip() == item["answer"] and item["answer"]

    def test_same_distribution_every_domain_in_every_split(self, corpus):
        for split in ("forget", "retain", "holdout"):
            counts = {d: sum(item["domain"] == d for item in corpus[split]) for d in DOMAINS}
            assert len(set(counts.values())) == 1, (split, counts)

    def test_no_prompt_shared_between_splits(self, corpus):
        prompts = [item["prompt"] for items in corpus.values() for item in items]
        assert len(prompts) == len(set(prompts))

    def test_domains_interleaved(self, corpus):
        first_five = {item["domain"] for item in corpus["forget"][:5]}
        assert len(first_five) > 1

    def test_arith_and_code_answers_are_correct(self, corpus):
        for item in corpus["forget"] + corpus["retain"] + corpus["holdout"]:
            q = item["prompt"][len("Q: "):-len(" A:")]
            if item["domain"] == "arith":
                expr = q[len("What is "):-1]
                assert str(eval(expr)) == item["answer"], item  # noqa: S307 (generated arithmetic only)
            elif item["domain"] == "code" and "upper" not in q and "def" not in q:
                snippet = q[:-len(" outputs?")].replace(" ; ", "\n").replace("print ( ", "_out = (")
                scope: dict = {}
                exec(snippet, {}, scope)  # noqa: S102 (generated snippets only)
                assert str(scope["_out"]) == item["answer"], item

    @pytest.mark.parametrize("kwargs, match", [({"seed": "0"}, "seed"), ({"n_per_domain": 2}, "n_per_domain"),
                                               ({"n_probe_per_domain": 11}, "n_probe_per_domain")])
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises((TypeError, ValueError), match=match):
            make_corpus(**kwargs)


class TestLoadJsonl:
    def test_prompt_answer_and_text_records(self, tmp_path):
        path = _write(tmp_path / "f.jsonl", [json.dumps({"prompt": "Q: a? A:", "answer": "b", "domain": "text"}),
                                            "", json.dumps({"text": "free text here"})])
        assert load_jsonl(path, "forget") == [{"prompt": "Q: a? A:", "answer": "b", "domain": "text"},
                                              {"text": "free text here"}]

    @pytest.mark.parametrize("bad, match", [
        ("{not json", r"f\.jsonl:3: invalid JSON"),
        ("[1, 2]", r"f\.jsonl:3: expected a JSON object, got list"),
        (json.dumps({"prompt": "x"}), r"f\.jsonl:3: .*missing \['answer'\]"),
        (json.dumps({"prompt": "x", "answer": ""}), r"f\.jsonl:3: 'answer' must be a non-empty string"),
        (json.dumps({"text": 5}), r"f\.jsonl:3: 'text' must be a non-empty string"),
    ])
    def test_bad_line_names_file_and_line(self, tmp_path, bad, match):
        good = json.dumps({"prompt": "p", "answer": "a"})
        path = _write(tmp_path / "f.jsonl", [good, good, bad, good])
        with pytest.raises(DataError, match=match):
            load_jsonl(path, "retain")

    def test_empty_split(self, tmp_path):
        path = _write(tmp_path / "empty.jsonl", ["", "   "])
        with pytest.raises(DataError, match=r"split 'forget' is empty: .*empty\.jsonl"):
            load_jsonl(path, "forget")

    def test_missing_file_and_bad_split(self, tmp_path):
        with pytest.raises(DataError, match="no such file"):
            load_jsonl(tmp_path / "nope.jsonl", "probe")
        with pytest.raises(ValueError, match="split must be one of"):
            load_jsonl(tmp_path / "nope.jsonl", "train")

    def test_data_error_is_value_error(self):
        assert issubclass(DataError, ValueError)


class TestEncode:
    def test_labels_supervise_answer_and_eos_only(self, corpus, tokenizer):
        items = corpus["forget"][:6]
        enc = encode(tokenizer, items)
        n, t = enc["input_ids"].shape
        assert enc["labels"].shape == enc["attention_mask"].shape == (n, t) and n == 6
        assert all(v.dtype == torch.long for v in enc.values())
        for i, item in enumerate(items):
            prompt = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(item["answer"], add_special_tokens=False)["input_ids"]
            real = int(enc["attention_mask"][i].sum())
            assert enc["attention_mask"][i, :real].all() and not enc["attention_mask"][i, real:].any()  # right padding
            assert enc["input_ids"][i, :real].tolist() == prompt + answer + [tokenizer.eos_token_id]
            assert enc["labels"][i].tolist() == [-100] * len(prompt) + answer + [tokenizer.eos_token_id] + [-100] * (t - real)
            assert (enc["input_ids"][i, real:] == tokenizer.pad_token_id).all()

    def test_text_items_fully_supervised(self, tokenizer):
        enc = encode(tokenizer, [{"text": "What is the capital of"}, {"text": "Q:"}])
        real = enc["attention_mask"].bool()
        assert torch.equal(enc["labels"][real], enc["input_ids"][real])
        assert (enc["labels"][~real] == -100).all()

    def test_bos_tokenizer_gets_unsupervised_bos(self, corpus):
        from transformers import PreTrainedTokenizerFast

        base = build_tokenizer(corpus)
        tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
                                      eos_token="<eos>", bos_token="<eos>")
        enc = encode(tok, corpus["forget"][:2] + [{"text": "What is"}])
        assert (enc["input_ids"][:, 0] == tok.bos_token_id).all()
        assert (enc["labels"][:, 0] == -100).all()
        assert enc["labels"][2, 1:3].tolist() == tok("What is", add_special_tokens=False)["input_ids"]

    def test_truncation_keeps_answer(self, corpus, tokenizer):
        item = corpus["forget"][0]
        enc = encode(tokenizer, [item], max_length=5)
        answer = tokenizer(item["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        kept = enc["labels"][0][enc["labels"][0] != -100].tolist()
        assert enc["input_ids"].shape[1] == 5 and kept == answer[:len(kept)] and len(kept) >= 1
        prompt = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
        assert enc["input_ids"][0, :5 - len(kept)].tolist() == prompt[len(prompt) - (5 - len(kept)):]

    @pytest.mark.parametrize("examples, kwargs, match", [
        ([], {}, "examples must be a non-empty list"),
        ([{"prompt": "x"}], {}, r"examples\[0\] must be a dict"),
        ([{"text": "x"}], {"max_length": 1}, "max_length"),
    ])
    def test_bad_input(self, tokenizer, examples, kwargs, match):
        with pytest.raises(ValueError, match=match):
            encode(tokenizer, examples, **kwargs)


class TestIterateBatches:
    def test_every_row_once_and_trimmed(self, corpus, tokenizer):
        enc = encode(tokenizer, corpus["retain"])
        enc["index"] = torch.arange(len(corpus["retain"]))
        seen = []
        for batch in iterate_batches(enc, 7, shuffle=True, seed=3):
            width = int(batch["attention_mask"].sum(1).max())
            assert batch["input_ids"].shape[1] == width == batch["labels"].shape[1]
            assert torch.equal(batch["input_ids"], enc["input_ids"][batch["index"], :width])
            assert (enc["attention_mask"][batch["index"], width:] == 0).all()
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(corpus["retain"])))
        assert len(seen) == 60

    def test_shuffle_deterministic_per_seed(self, corpus, tokenizer):
        enc = encode(tokenizer, corpus["forget"])
        enc["index"] = torch.arange(30)

        def order(seed, shuffle=True):
            return torch.cat([b["index"] for b in iterate_batches(enc, 8, shuffle=shuffle, seed=seed)]).tolist()

        assert order(1) == order(1) and order(1) != order(2)
        assert order(0, shuffle=False) == list(range(30))

    @pytest.mark.parametrize("bs", [0, -1, 2.5, True])
    def test_bad_batch_size(self, corpus, tokenizer, bs):
        enc = encode(tokenizer, corpus["forget"][:3])
        with pytest.raises(ValueError, match="batch_size"):
            next(iterate_batches(enc, bs))
