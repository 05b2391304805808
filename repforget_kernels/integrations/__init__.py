"""Integrations with training frameworks; each submodule imports its framework, this package imports none.

- :mod:`repforget_kernels.integrations.transformers`: ``RepresentationCallback``, a ``transformers``
  ``TrainerCallback`` logging a :class:`~repforget_kernels.RepresentationMonitor`'s scalars.
"""
__all__: list[str] = []
