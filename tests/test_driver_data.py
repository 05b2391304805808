"""Driver data: JSONL loading (line-numbered errors), encoding, batching (the corpus: test_driver_benchmark.py)."""
from __future__ import annotations

import json

import pytest
import torch

from repforget_kernels.driver.data import DataError, encode, iterate_batches, load_jsonl
from repforget_kernels.driver.pretrain import build_tokenizer

from conftest import SMALL_TINY, small_benchmark


@pytest.fixture(scope="module")
def corpus():
    return small_benchmark()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_tokenizer(corpus, SMALL_TINY["vocab_size"])


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class TestLoadJsonl:
    def test_prompt_answer_and_text_records(self, tmp_path):
        path = _write(tmp_path / "f.jsonl", [json.dumps({"prompt": "Q: a? A:", "answer": "b", "domain": "text"}),
                                            "", json.dumps({"text": "free text here"})])
        assert load_jsonl(path, "forget") == [{"prompt": "Q: a? A:", "answer": "b", "domain": "text"},
                                              {"text": "free text here"}]

    def test_non_utf8_names_the_line(self, tmp_path):
        path = tmp_path / "latin1.jsonl"
        path.write_bytes(json.dumps({"prompt": "a", "answer": "b"}).encode() + b"\n" + '{"prompt": "caf\u00e9"}'.encode("latin-1"))
        with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text"):
            load_jsonl(path, "forget")

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

    def test_missing_file(self, tmp_path):
        with pytest.raises(DataError, match=r"nope\.jsonl: no such file \(split 'unrelated'\)"):
            load_jsonl(tmp_path / "nope.jsonl", "unrelated")

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
            answer = tokenizer(" " + item["answer"], add_special_tokens=False)["input_ids"]  # in context: after a space
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

        base = build_tokenizer(corpus, SMALL_TINY["vocab_size"])
        tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token="<pad>", eos_token="<eos>",
                                      bos_token="<eos>")
        enc = encode(tok, corpus["forget"][:2] + [{"text": "What is"}])
        assert (enc["input_ids"][:, 0] == tok.bos_token_id).all()
        assert (enc["labels"][:, 0] == -100).all()
        assert enc["labels"][2, 1:3].tolist() == tok("What is", add_special_tokens=False)["input_ids"]

    def test_truncation_keeps_answer(self, corpus, tokenizer):
        item = corpus["forget"][0]
        enc = encode(tokenizer, [item], max_length=5)
        answer = tokenizer(" " + item["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
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

    def test_shuffle_deterministic_per_seed(self, corpus, tokenizer):
        enc = encode(tokenizer, corpus["forget"])
        enc["index"] = torch.arange(len(corpus["forget"]))

        def order(seed, shuffle=True):
            return torch.cat([b["index"] for b in iterate_batches(enc, 8, shuffle=shuffle, seed=seed)]).tolist()

        assert order(1) == order(1) and order(1) != order(2)
        assert order(0, shuffle=False) == list(range(len(corpus["forget"])))

    @pytest.mark.parametrize("bs", [0, -1, 2.5, True])
    def test_bad_batch_size(self, corpus, tokenizer, bs):
        enc = encode(tokenizer, corpus["forget"][:3])
        with pytest.raises(ValueError, match="batch_size"):
            next(iterate_batches(enc, bs))
