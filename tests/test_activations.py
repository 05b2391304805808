"""Activations: the collector's rows are the block outputs (checked against HF's output_hidden_states), pooled with
the attention mask, for tiny Llama, Qwen2 and GPT-2 models built from configs, padded left and right; the context
manager around one's own forward passes; the streaming sinks against the same statistics on stored rows."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from repforget_kernels import (
    LayerActivations,
    PairedStreamingCKA,
    RunningMoments,
    collect_activations,
    decoder_layers,
    linear_cka,
    pool_tokens,
)

VOCAB = 64
ARCHS = ("llama", "qwen2", "gpt2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention (a 3 ms forward takes 0.4 s on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """An untrained 3-block causal LM of width 32 (seeded, eval mode)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=32, bos_token_id=0,
                         eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return (LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))).eval()


def final_norm(model) -> torch.nn.Module:
    """The norm HF applies to the last block's output before reporting it as the last hidden state."""
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def padded_batches(side: str, n_batches: int = 3, b: int = 4, t: int = 9, seed: int = 0) -> list:
    """Tokenizer-style batches with sequences of uneven length, padded on ``side`` (labels too, to be dropped)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (b, t), generator=gen)  # (B, T)
        lengths = torch.randint(2, t + 1, (b,), generator=gen)
        lengths[0] = t  # the batch's longest sequence fills it
        pos = torch.arange(t).expand(b, t)
        real = pos < lengths[:, None] if side == "right" else pos >= t - lengths[:, None]  # (B, T)
        mask = real.long()
        ids = ids.masked_fill(~real, 0)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~real, -100)})
    return out


def hidden_states(model, batches: list) -> list:
    """Per batch, HF's hidden states: (embeddings, block 0, ..., block L-2, final_norm(block L-1))."""
    with torch.no_grad():
        return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
                for b in batches]


class TestCollectorMatchesHiddenStates:
    """Same forward computation on the same inputs, so the rows agree bitwise (tolerance 0)."""

    @pytest.mark.parametrize("arch", ARCHS)
    @pytest.mark.parametrize("side", ["left", "right"])
    @pytest.mark.parametrize("sample", ["mean", "last", "first", "tokens"])
    def test_blocks_before_the_last(self, arch, side, sample):
        model, batches = tiny_model(arch), padded_batches(side)
        rows = collect_activations(model, batches, sample=sample)
        hs = hidden_states(model, batches)
        assert len(rows) == 3
        for i in range(2):  # hidden_states[i + 1] is block i's output for every block but the last
            want = torch.cat([pool_tokens(h[i + 1], b["attention_mask"], sample=sample) for h, b in zip(hs, batches)])
            torch.testing.assert_close(rows[i], want, rtol=0, atol=0)

    @pytest.mark.parametrize("arch", ARCHS)
    @pytest.mark.parametrize("side", ["left", "right"])
    def test_last_block_is_before_the_final_norm(self, arch, side):
        """HF's last hidden state is final_norm(last block output): a per-token map, so compare token rows."""
        model, batches = tiny_model(arch), padded_batches(side)
        rows = collect_activations(model, batches, sample="tokens")[-1]  # (n_real, d)
        hs = hidden_states(model, batches)
        want = torch.cat([h[-1][b["attention_mask"] != 0] for h, b in zip(hs, batches)])
        with torch.no_grad():
            torch.testing.assert_close(final_norm(model)(rows), want, rtol=0, atol=0)
        assert not torch.allclose(rows, want)  # the norm does change them: the collector is not reading hidden_states[-1]

    def test_last_token_follows_the_padding_side(self):
        model, left, right = tiny_model("llama"), padded_batches("left"), padded_batches("right")
        for batches in (left, right):
            per_token = collect_activations(model, batches, sample="tokens")[0]
            last = collect_activations(model, batches, sample="last")[0]
            ends = torch.cat([b["attention_mask"].sum(1) for b in batches]).cumsum(0) - 1  # last real token of each sequence
            torch.testing.assert_close(last, per_token[ends], rtol=0, atol=0)


class TestCollector:
    def test_one_forward_per_batch_mode_kept_and_hooks_removed(self):
        model, batches = tiny_model("qwen2"), padded_batches("right")
        model.train()
        model.model.layers[1].eval()  # a mixed state, restored module by module
        calls = []
        pre = model.register_forward_pre_hook(lambda *a: calls.append(1))
        rows = collect_activations(model, batches)
        pre.remove()
        assert len(calls) == len(batches)
        assert [r.shape for r in rows] == [(12, 32)] * 3 and rows[0].dtype == torch.float32
        assert model.training and not model.model.layers[1].training and model.model.layers[0].training
        assert all(len(m._forward_hooks) == 0 for m in decoder_layers(model))
        assert len(model._forward_hooks) == 0 and len(model._forward_pre_hooks) == 0

    def test_max_rows_keeps_the_first_rows_across_batches(self):
        model, batches = tiny_model("gpt2"), padded_batches("left")
        every = collect_activations(model, batches, sample="tokens")
        capped = collect_activations(model, iter(batches), sample="tokens", max_rows=17)  # a one-shot iterable
        for a, b in zip(capped, every):
            torch.testing.assert_close(a, b[:17], rtol=0, atol=0)

    def test_batches_without_attention_mask_count_every_token(self):
        model = tiny_model("llama")
        batch = {"input_ids": padded_batches("right")[0]["input_ids"]}
        rows = collect_activations(model, [batch], sample="tokens")
        assert rows[0].shape == (batch["input_ids"].numel(), 32)

    def test_bad_batches_and_settings_are_named(self):
        model = tiny_model("llama")
        with pytest.raises(TypeError, match=r"batches\[0\] must be a dict with 'input_ids'"):
            collect_activations(model, [torch.ones(2, 3, dtype=torch.long)])
        ids = torch.ones(2, 3, dtype=torch.long)
        with pytest.raises(ValueError, match=r"batches\[1\]\['attention_mask'\] must be shaped like input_ids"):
            collect_activations(model, [{"input_ids": ids}, {"input_ids": ids, "attention_mask": torch.ones(2, 4)}])
        with pytest.raises(ValueError, match="sample must be one of"):
            collect_activations(model, [{"input_ids": ids}], sample="cls")
        with pytest.raises(ValueError, match="max_rows must be None or an int >= 0"):
            collect_activations(model, [{"input_ids": ids}], max_rows=-1)


class _Block(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return (torch.tanh(self.lin(x)), None)  # a tuple, as many blocks return


class _Net(torch.nn.Module):
    """A non-HF model: forward(x, attention_mask) with its blocks in a plain attribute."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.stack = [_Block(d), _Block(d)]
        for i, block in enumerate(self.stack):
            self.add_module(f"block{i}", block)

    def forward(self, x, attention_mask=None):
        for block in self.stack:
            x = block(x)[0]
        return x


class TestLayerActivations:
    def test_around_own_passes_with_positional_mask_and_given_blocks(self):
        net, gen = _Net(), torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 6, generator=gen)  # (B, T, d)
        mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
        with LayerActivations(net, layers=net.stack, sample="mean") as acts:
            with torch.no_grad():
                net(x, mask)  # the mask passed positionally
                net(x, attention_mask=mask)
        h0 = torch.tanh(net.block0.lin(x)).detach()
        want = pool_tokens(h0, mask, sample="mean")
        torch.testing.assert_close(acts.rows[0], torch.cat([want, want]), rtol=0, atol=0)
        assert acts.stack().shape == (2, 6, 6) and acts.n_rows == 6
        acts.clear()
        assert acts.n_rows == 0

    def test_reentry_accumulates_and_hooks_go_on_error(self):
        model, batches = tiny_model("llama"), padded_batches("right")
        acts = LayerActivations(model, sample="last")
        for b in batches[:2]:
            with acts, torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        assert acts.n_rows == 8
        with pytest.raises(RuntimeError, match="stop"):
            with acts:
                raise RuntimeError("stop")
        assert all(len(m._forward_hooks) == 0 for m in decoder_layers(model)) and len(model._forward_hooks) == 0

    def test_training_pass_keeps_its_graph_and_rows_are_detached(self):
        model, b = tiny_model("qwen2"), padded_batches("left")[0]
        model.train()
        with LayerActivations(model) as acts:
            loss = model(**b).loss
        loss.backward()
        assert all(p.grad is not None for p in decoder_layers(model)[0].parameters())
        assert not acts.rows[0].requires_grad and model.training

    def test_kept_first_token_rows_do_not_hold_the_block_outputs(self):
        model, b = tiny_model("llama"), padded_batches("right")[0]
        with torch.no_grad(), LayerActivations(model, sample="first") as acts:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        rows = acts.rows[0]  # token 0 is a view of the (B, T, d) output; what is kept must be a copy
        assert rows.shape == (4, 32) and rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()

    def test_mask_of_another_shape_is_an_error(self):
        net = _Net()
        with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\) = \(2, 5\)"):
            with LayerActivations(net, layers=net.stack), torch.no_grad():
                net(torch.randn(2, 5, 6), torch.ones(2, 4))

    def test_settings_checked(self):
        net = _Net()
        with pytest.raises(ValueError, match="keep=False without a stream"):
            LayerActivations(net, layers=net.stack, keep=False)
        with pytest.raises(TypeError, match="layers must be a sequence of modules"):
            LayerActivations(net, layers=net.block0)
        with pytest.raises(ValueError, match="no ModuleList of identical decoder blocks"):
            LayerActivations(net)


class TestStreams:
    def test_paired_streaming_cka_equals_linear_cka_on_all_token_rows(self):
        ref, upd, batches = tiny_model("llama", 0), tiny_model("llama", 1), padded_batches("left")
        paired = PairedStreamingCKA(3)
        with torch.no_grad(), LayerActivations(ref, sample="tokens", keep=False, stream=paired.reference), \
                LayerActivations(upd, sample="tokens", keep=False, stream=paired.updated):
            for b in batches:
                ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                upd(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        x, y = collect_activations(ref, batches, sample="tokens"), collect_activations(upd, batches, sample="tokens")
        want = torch.stack([linear_cka(a.double(), b.double()) for a, b in zip(x, y)])
        # float32 rows, float64 sums in both: the two differ by the float32 rounding of the per-chunk
        # shift and GEMM inputs, ~1e-7 relative on a value of order 1; 1e-5 leaves room for n = 100 rows
        torch.testing.assert_close(paired.compute().double(), want, rtol=0, atol=1e-5)

    def test_paired_order_is_checked(self):
        paired = PairedStreamingCKA(2)
        with pytest.raises(ValueError, match="without reference rows"):
            paired.updated(0, torch.randn(4, 3))
        paired.reference(1, torch.randn(4, 3))
        with pytest.raises(ValueError, match="fed twice"):
            paired.reference(1, torch.randn(4, 3))

    def test_running_moments_equal_mean_and_covariance_of_every_row(self):
        model, batches = tiny_model("gpt2"), padded_batches("right")
        moments = RunningMoments(3, covariance=True)
        with torch.no_grad(), LayerActivations(model, sample="tokens", keep=False, stream=moments):
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        rows = collect_activations(model, batches, sample="tokens")
        for i, r in enumerate(rows):
            r = r.double()
            assert moments.n[i] == r.shape[0]
            # float64 sums of float32 rows (exact in float64): only float64 rounding, ~1e-15 relative
            torch.testing.assert_close(moments.mean(i), r.mean(0), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(moments.covariance(i), torch.cov(r.T), rtol=1e-10, atol=1e-12)

    def test_running_moments_keep_precision_under_a_large_offset(self):
        gen = torch.Generator().manual_seed(0)
        x = 1e6 + torch.randn(1000, 4, generator=gen, dtype=torch.float64)  # (n, d): massive-activation-like offset
        moments = RunningMoments(1, covariance=True)
        for chunk in x.split(128):
            moments.update(0, chunk)
        # x - c rounds each entry by ~1e6 * 2^-53 = 1e-10 (c: the first chunk's mean, ~0.1 from the true one), on
        # covariances of order 1; the naive sum of squares would lose all digits (1e12 * 2^-53 = 1e-4)
        torch.testing.assert_close(moments.covariance(0), torch.cov(x.T), rtol=1e-9, atol=1e-9)
        with pytest.raises(ValueError, match="keeps no second moment"):
            RunningMoments(1).covariance(0)
