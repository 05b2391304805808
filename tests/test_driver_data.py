"""Driver data: JSONL / JSON / parquet / datasets loading (line-numbered errors), TOFU records, encoding (text
windows, chat template), position ids under left padding, batching (the corpus: test_driver_benchmark.py)."""
from __future__ import annotations

import json

import pytest
import torch

from repforget_kernels.driver.data import (
    DataError,
    encode,
    iterate_batches,
    load_jsonl,
    load_split,
    position_ids,
)
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


TOFU = [{"question": "Who wrote 'Blue Harbour'?", "answer": "Mira Okonjo wrote it.",
         "paraphrased_answer": "It was written by Mira Okonjo.",
         "perturbed_answer": ["Lars Berg wrote it.", "Ana Ruiz wrote it."]},
        {"question": "Where was Mira Okonjo born?", "answer": "In Lagos."}]
TOFU_ITEMS = [{"prompt": "Who wrote 'Blue Harbour'?", "answer": "Mira Okonjo wrote it.",
               "paraphrased_answer": "It was written by Mira Okonjo.",
               "perturbed_answer": ["Lars Berg wrote it.", "Ana Ruiz wrote it."]},
              {"prompt": "Where was Mira Okonjo born?", "answer": "In Lagos."}]


class TestTofuAndFormats:
    def test_tofu_jsonl_and_json_array(self, tmp_path):
        lines = _write(tmp_path / "forget.jsonl", [json.dumps(r) for r in TOFU])
        array = tmp_path / "forget.json"
        array.write_text(json.dumps(TOFU, indent=2), encoding="utf-8")
        assert load_split(lines, "forget") == TOFU_ITEMS
        assert load_split(array, "forget") == TOFU_ITEMS

    def test_datasets_directory_and_parquet(self, tmp_path):
        datasets = pytest.importorskip("datasets")
        data = datasets.Dataset.from_list([dict(r, perturbed_answer=r.get("perturbed_answer", ["x"]),
                                                paraphrased_answer=r.get("paraphrased_answer")) for r in TOFU])
        data.save_to_disk(str(tmp_path / "ds"))
        data.to_parquet(str(tmp_path / "forget.parquet"))
        want = [TOFU_ITEMS[0], dict(TOFU_ITEMS[1], perturbed_answer=["x"])]
        assert load_split(tmp_path / "ds", "forget") == want
        assert load_split(tmp_path / "forget.parquet", "forget") == want
        datasets.DatasetDict({"forget01": data, "retain99": data}).save_to_disk(str(tmp_path / "dd"))
        assert load_split(tmp_path / "dd", "forget01") == want
        with pytest.raises(DataError, match=r"holds splits \['forget01', 'retain99'\], none named 'holdout'"):
            load_split(tmp_path / "dd", "holdout")

    @pytest.mark.parametrize("record, match", [
        ({"question": "q"}, r"record 0: .*missing \['answer'\]"),
        ({"question": "q", "answer": "a", "perturbed_answer": []}, "'perturbed_answer' must be a non-empty list"),
        ({"question": "", "answer": "a"}, "'question' must be a non-empty string"),
    ])
    def test_bad_tofu_record(self, tmp_path, record, match):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps([record]), encoding="utf-8")
        with pytest.raises(DataError, match=match):
            load_split(path, "forget")


class TestTextWindows:
    def test_long_text_becomes_overlapping_windows_each_token_once(self, tokenizer):
        text = " ".join(f"word{i}" for i in range(60))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert len(ids) > 40
        enc = encode(tokenizer, [{"text": text}], max_length=16)
        rows = enc["input_ids"].shape[0]
        assert rows > 1 and enc["input_ids"].shape[1] == 16
        supervised = [t for r in range(rows) for t in enc["labels"][r].tolist() if t != -100]
        assert supervised == ids  # every token supervised exactly once, in order
        for r in range(1, rows):  # a later window starts with the last 16 // 4 tokens of the one before
            prev = enc["input_ids"][r - 1][enc["attention_mask"][r - 1].bool()].tolist()
            assert enc["input_ids"][r, :4].tolist() == prev[-4:] and (enc["labels"][r, :4] == -100).all()

    def test_short_text_is_one_row(self, tokenizer):
        assert encode(tokenizer, [{"text": "one two"}], max_length=16)["input_ids"].shape[0] == 1


class TestChatTemplate:
    TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"

    def test_prompt_rendered_answer_follows(self, corpus, tokenizer):
        import copy

        tok = copy.deepcopy(tokenizer)
        tok.chat_template = self.TEMPLATE
        item = corpus["forget"][0]
        enc = encode(tok, [item], max_length=64, chat_template=True)
        rendered = f"<|user|>{item['prompt']}<|assistant|>"
        prompt = tok(rendered, add_special_tokens=False)["input_ids"]
        answer = tok(item["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        real = int(enc["attention_mask"][0].sum())
        assert enc["input_ids"][0, :real].tolist() == prompt + answer
        assert enc["labels"][0, :real].tolist() == [-100] * len(prompt) + answer

    def test_tokenizer_without_template(self, corpus, tokenizer):
        with pytest.raises(ValueError, match="the tokenizer has no chat template"):
            encode(tokenizer, corpus["forget"][:1], chat_template=True)


class TestPositionIds:
    def test_follow_the_mask(self):
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
        assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]]

    def test_gpt2_scores_equal_under_left_and_right_padding(self, corpus, tokenizer):
        """Absolute positions: with position ids from the mask, a left-padded batch scores like the right-padded one."""
        from transformers import GPT2Config, GPT2LMHeadModel

        from repforget_kernels.driver.evaluate import split_scores

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           eos_token_id=tokenizer.eos_token_id)).eval()
        right = encode(tokenizer, corpus["forget"][:6])
        left = {key: torch.zeros_like(value) for key, value in right.items()}
        left["labels"].fill_(-100)
        for i in range(6):
            n = int(right["attention_mask"][i].sum())
            for key in right:
                left[key][i, -n:] = right[key][i, :n]
        assert (left["attention_mask"][:, 0] == 0).any()  # really left padded
        a = split_scores(model, right, batch_size=6, tokenizer=tokenizer)
        b = split_scores(model, left, batch_size=6, tokenizer=tokenizer)
        for key in ("nll", "loss", "min_k", "min_k_plus_plus"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
