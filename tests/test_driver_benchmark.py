"""The embedded benchmark: entity-split facts, paraphrase hold-out, answer lengths, utility tasks."""
from __future__ import annotations

import pytest

from repforget_kernels.driver.benchmark import (
    ATTRIBUTES,
    BENCHMARK_SPLITS,
    FORGET_SIZES,
    TEMPLATES,
    TEMPLATES_PER_ATTRIBUTE,
    UTILITY_TASKS,
    BenchmarkConfig,
    make_benchmark,
    pretraining_items,
)
from repforget_kernels.driver.pretrain import build_tokenizer

FACT_SPLITS = ("forget", "retain", "forget_paraphrase", "retain_paraphrase", "holdout")


@pytest.fixture(scope="module")
def corpus():
    return make_benchmark(0)


def _entities(items) -> set:
    return {item["entity"] for item in items}


class TestCorpus:
    def test_pure_function_of_the_seed(self, corpus):
        assert make_benchmark(0) == corpus
        assert make_benchmark(1) != corpus
        assert set(corpus) == set(BENCHMARK_SPLITS)

    def test_sizes_like_tofu(self, corpus):
        cfg = BenchmarkConfig()
        assert cfg.entities >= 100 and 6 <= len(ATTRIBUTES) <= 10 and TEMPLATES_PER_ATTRIBUTE >= 3
        assert all(len(t) == TEMPLATES_PER_ATTRIBUTE for t in TEMPLATES.values())
        n_forget = len(_entities(corpus["forget"]))
        assert n_forget == 10 and len(_entities(corpus["retain"])) == cfg.entities - n_forget
        trained = TEMPLATES_PER_ATTRIBUTE - 1
        assert len(corpus["forget"]) == n_forget * len(ATTRIBUTES) * trained
        assert len(corpus["forget_paraphrase"]) == n_forget * len(ATTRIBUTES)
        assert len(_entities(corpus["holdout"])) == cfg.holdout_entities

    def test_forget_retain_holdout_share_templates_but_no_entity(self, corpus):
        forget, retain, holdout = (_entities(corpus[s]) for s in ("forget", "retain", "holdout"))
        assert not (forget & retain) and not (forget & holdout) and not (retain & holdout)
        templates = {s: {(i["attribute"], i["template"]) for i in corpus[s]} for s in ("forget", "retain", "holdout")}
        assert templates["forget"] == templates["retain"] == templates["holdout"]
        unrelated = _entities(corpus["unrelated"])
        assert not unrelated & (forget | retain | holdout)

    def test_paraphrase_template_is_held_out_of_training(self, corpus):
        held = TEMPLATES_PER_ATTRIBUTE - 1
        trained = pretraining_items(corpus)
        assert all(i.get("template") != held for i in trained)
        prompts = {i["prompt"] for i in trained}
        for split, entities in (("forget_paraphrase", "forget"), ("retain_paraphrase", "retain")):
            assert {i["template"] for i in corpus[split]} == {held}
            assert _entities(corpus[split]) == _entities(corpus[entities])
            assert not {i["prompt"] for i in corpus[split]} & prompts

    def test_every_fact_asked_through_every_trained_template(self, corpus):
        for split in ("forget", "retain", "holdout"):
            by_fact = {}
            for i in corpus[split]:
                by_fact.setdefault((i["entity"], i["attribute"]), set()).add(i["template"])
            assert all(t == set(range(TEMPLATES_PER_ATTRIBUTE - 1)) for t in by_fact.values())
            assert len({a for _, a in by_fact}) == len(ATTRIBUTES)

    def test_answers_span_two_to_six_tokens(self, corpus):
        tok = build_tokenizer(corpus)
        for split in FACT_SPLITS + ("unrelated",):
            for item in corpus[split]:
                n = len(tok(" " + item["answer"], add_special_tokens=False)["input_ids"])
                assert 2 <= n <= 6, (split, item["answer"], n)

    def test_utility_is_computed_by_a_rule_on_unseen_operands(self, corpus):
        def operands(item):
            return tuple(item["prompt"].rstrip(":").split()[3:])

        trained = {operands(i) for i in corpus["utility_train"]}
        for item in corpus["utility"]:
            words = operands(item)
            assert words not in trained  # never trained: only the rule gives the answer
            want = {"repeat": list(words), "reverse": list(words[::-1]), "swap": list(words[::-1])}[item["task"]]
            assert item["answer"].split() == want
        assert {i["task"] for i in corpus["utility"]} == set(UTILITY_TASKS)

    def test_forget_sizes_are_nested_whole_entities(self):
        sets = {size: _entities(make_benchmark(0, BenchmarkConfig(forget=size))["forget"]) for size in FORGET_SIZES}
        assert [len(sets[s]) for s in ("forget01", "forget05", "forget10")] == [1, 5, 10]
        assert sets["forget01"] < sets["forget05"] < sets["forget10"]

    def test_retain_oracle_items_exclude_the_forget_entities(self, corpus):
        oracle = pretraining_items(corpus, include_forget=False)
        assert not {i.get("entity") for i in oracle} & _entities(corpus["forget"])
        assert len(pretraining_items(corpus)) == len(oracle) + len(corpus["forget"])

    @pytest.mark.parametrize("kwargs,match", [
        ({"entities": 1}, "entities must be >= 2"),
        ({"forget": "forget50"}, "forget must be one of"),
        ({"utility": 0}, "utility must be a positive int"),
    ])
    def test_bad_config(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            BenchmarkConfig(**kwargs)

    def test_bad_seed(self):
        with pytest.raises(TypeError, match="seed must be an int"):
            make_benchmark("0")
