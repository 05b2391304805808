"""``transformers.Trainer`` integration: log a :class:`~repforget_kernels.RepresentationMonitor` through the Trainer.

    monitor = RepresentationMonitor(model, probe_batches, every=200)    # before training
    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.add_callback(RepresentationCallback(monitor, trainer=trainer))
    trainer.train()     # trainer.state.log_history, TensorBoard, W&B, ... get "repr/cka/layer_0", ...

On every measured step (``state.global_step % monitor.every == 0``) the callback measures the model
the Trainer trains. With ``trainer`` it logs the scalars by ``trainer.log`` (a record of their own
in ``state.log_history``, and every callback's ``on_log``, so every ``report_to`` integration
receives them). Without it (``RepresentationCallback(monitor)`` in ``Trainer(callbacks=[...])``) it
forces a Trainer log at that step and merges the scalars into that record of ``state.log_history``
and into the ``logs`` the callbacks after it see; the ``report_to`` integrations run before user
callbacks, so they do not receive them then: pass ``trainer`` for those.
"""
from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback

from ..monitor import RepresentationMonitor

__all__ = ["RepresentationCallback"]


class RepresentationCallback(TrainerCallback):
    """A ``TrainerCallback`` that runs ``monitor.step(model, state.global_step)`` after every optimizer step.

    Args:
        monitor: a :class:`~repforget_kernels.RepresentationMonitor` (its reference statistics are
            taken when it is built: build it before training).
        trainer: the ``Trainer`` to log through (``trainer.log``); None: merge into the Trainer's own
            log record of the step (see the module docstring).
    """

    def __init__(self, monitor: RepresentationMonitor, *, trainer=None):
        if not isinstance(monitor, RepresentationMonitor):
            raise TypeError(f"monitor must be a RepresentationMonitor, got {type(monitor).__name__}")
        if trainer is not None and not callable(getattr(trainer, "log", None)):
            raise TypeError(f"trainer must be a transformers.Trainer (with .log), got {type(trainer).__name__}")
        self.monitor, self.trainer = monitor, trainer
        self._pending: Optional[dict] = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        scalars = self.monitor.step(model, state.global_step)
        if scalars is None:
            return control
        if self.trainer is not None:
            self.trainer.log(dict(scalars))
        else:
            self._pending = scalars
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None:
            return control
        if logs is not None:
            logs.update(self._pending)
        if state.log_history:
            state.log_history[-1].update(self._pending)
        self._pending = None
        return control
