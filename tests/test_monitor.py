"""RepresentationMonitor in a training loop (scalars on measured steps only, equal to compare_models, no effect on
training: modes, gradients and the random stream kept) and RepresentationCallback in a transformers.Trainer."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from repforget_kernels import ReferenceStatistics, RepresentationMonitor, compare_models, comparison_scalars

from test_activations import one_thread, padded_batches, tiny_model  # noqa: F401 (one_thread: autouse)


def sgd_steps(model, batches, steps: int, monitor=None, lr: float = 0.5) -> list:
    """A plain training loop (dropout on); returns the monitor's non-None outputs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    logged = []
    for step in range(1, steps + 1):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if monitor is not None:
            out = monitor.step(model, step)
            if out is not None:
                logged.append((step, out))
    return logged


class TestMonitor:
    def test_measured_steps_only_and_scalars_equal_the_comparison(self):
        ref, probe = tiny_model("llama"), padded_batches("left", n_batches=2)
        model = copy.deepcopy(ref)
        monitor = RepresentationMonitor(ref, probe, every=3, pca_k=2)
        logged = sgd_steps(model, padded_batches("right", seed=3), steps=7, monitor=monitor)
        assert [s for s, _ in logged] == [3, 6]
        scalars = monitor.step(model, 0)
        want = compare_models(ReferenceStatistics.compute(ref, probe), model, probe, pca_k=2)
        for name in ("cka", "cka_debiased", "pca_similarity", "pca_similarity_k"):
            for i in range(3):
                assert scalars[f"repr/{name}/layer_{i}"] == float(getattr(want, name)[i])
            assert scalars[f"repr/{name}/mean"] == pytest.approx(float(getattr(want, name).double().mean()), rel=1e-12)
        assert scalars["repr/pca_shift_pc2/layer_1"] == float(want.pca_shift[1, 1])
        assert all(isinstance(v, float) for v in scalars.values())
        assert "repr/cka_tokens/mean" not in scalars and "repr/fisher_mass_ratio/mean" not in scalars
        assert scalars["repr/cka/mean"] < 0.999  # training moved the representation

    def test_reference_taken_before_training_the_same_object(self):
        model, probe = tiny_model("qwen2"), padded_batches("left", n_batches=2)
        monitor = RepresentationMonitor(model, probe, every=2, token_cka=True)  # the model that is trained next
        before = monitor.step(model, 0)
        # identical rows: 1 up to the float32 rounding of the products (~1e-7)
        assert before["repr/cka/mean"] == pytest.approx(1.0, abs=1e-5)
        assert before["repr/cka_tokens/mean"] == pytest.approx(1.0, abs=1e-5)
        after = sgd_steps(model, padded_batches("right", seed=3), steps=2, monitor=monitor)[-1][1]
        assert after["repr/cka_tokens/mean"] < 0.999 and after["repr/pca_similarity/mean"] <= 1.0 + 1e-5

    def test_training_is_unchanged_by_the_monitor(self):
        """Same dropout draws, same gradients, same weights: the monitor restores modes and the random stream."""
        start, probe, train = tiny_model("gpt2"), padded_batches("left", n_batches=2), padded_batches("right", seed=3)
        assert start.config.resid_pdrop > 0  # dropout draws from the global generator while training
        plain, watched = copy.deepcopy(start), copy.deepcopy(start)
        torch.manual_seed(7)
        sgd_steps(plain, train, steps=4)
        monitor = RepresentationMonitor(start, probe, every=1, fisher_batches=train[:1], fisher_samples=50)
        torch.manual_seed(7)
        assert len(sgd_steps(watched, train, steps=4, monitor=monitor)) == 4
        for (name, a), b in zip(plain.named_parameters(), watched.parameters()):
            assert torch.equal(a, b), name
        assert watched.training

    def test_modes_and_gradients_left_as_they_were(self):
        model, probe = tiny_model("llama"), padded_batches("left", n_batches=1)
        monitor = RepresentationMonitor(model, probe, every=1, fisher_batches=probe, fisher_samples=50)
        model.train()
        model.model.layers[0].eval()
        grads = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        state = torch.get_rng_state()
        scalars = monitor.step(model, 5)
        assert "repr/fisher_rank_corr/layer_2" in scalars
        assert model.training and not model.model.layers[0].training and model.model.layers[1].training
        assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
        assert torch.equal(torch.get_rng_state(), state)

    def test_undefined_values_are_nan_floats(self):
        model, probe = tiny_model("llama"), padded_batches("left", n_batches=1)
        stats = ReferenceStatistics.compute(model, probe)
        stats.rows = torch.ones_like(stats.rows)  # constant reference rows: CKA and PCA undefined on every layer
        out = comparison_scalars(compare_models(stats, model, probe))
        assert math.isnan(out["repr/cka/layer_0"]) and math.isnan(out["repr/cka/mean"])
        assert all(isinstance(v, float) for v in out.values())

    def test_arguments_checked(self):
        model, probe = tiny_model("llama"), padded_batches("left", n_batches=1)
        with pytest.raises(ValueError, match="every must be a positive int"):
            RepresentationMonitor(model, probe, every=0)
        with pytest.raises(ValueError, match="probe_batches is empty"):
            RepresentationMonitor(model, [])
        with pytest.raises(TypeError, match="reference must be a torch.nn.Module or ReferenceStatistics"):
            RepresentationMonitor("base", probe)
        with pytest.raises(TypeError, match="step must be an int"):
            RepresentationMonitor(model, probe).step(model, 1.0)


class TestTrainerCallback:
    def _trainer(self, tmp_path, model, callbacks=()):
        from transformers import Trainer, TrainingArguments

        rows = [{k: v[i] for k, v in b.items()} for b in padded_batches("right", n_batches=2, seed=3) for i in range(4)]
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=1e-2, logging_steps=100, report_to=[], save_strategy="no",
                                 disable_tqdm=True, use_cpu=True)
        return Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))

    def test_scalars_land_in_log_history(self, tmp_path):
        from repforget_kernels.integrations.transformers import RepresentationCallback

        model, probe = tiny_model("llama"), padded_batches("left", n_batches=1)
        monitor = RepresentationMonitor(model, probe, every=2)
        trainer = self._trainer(tmp_path, model, [RepresentationCallback(monitor)])
        trainer.train()
        records = [r for r in trainer.state.log_history if "repr/cka/mean" in r]
        assert [r["step"] for r in records] == [2, 4]
        assert "repr/pca_similarity/layer_2" in records[0] and "loss" in records[0]  # merged into the Trainer's record

    def test_through_trainer_log_every_callback_receives_them(self, tmp_path):
        from transformers import TrainerCallback

        from repforget_kernels.integrations.transformers import RepresentationCallback

        class Recorder(TrainerCallback):  # stands for TensorBoard / W&B, which run before user callbacks
            seen: list = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.seen.append(dict(logs))

        model, probe = tiny_model("llama"), padded_batches("left", n_batches=1)
        recorder = Recorder()
        trainer = self._trainer(tmp_path, model, [recorder])
        trainer.add_callback(RepresentationCallback(RepresentationMonitor(model, probe, every=2), trainer=trainer))
        trainer.train()
        assert [r["step"] for r in trainer.state.log_history if "repr/cka/layer_0" in r] == [2, 4]
        assert sum("repr/cka/layer_0" in logs for logs in recorder.seen) == 2

    def test_callback_arguments_checked(self):
        from repforget_kernels.integrations.transformers import RepresentationCallback

        with pytest.raises(TypeError, match="monitor must be a RepresentationMonitor"):
            RepresentationCallback(object())
