"""The phantom: synthetic serial brain MRI (BIDS) with complete ground truth.

>>> from pipeline.simulate import simulate_dataset, PRESETS
>>> simulate_dataset("out", preset="mixed", n_subjects=3, seed=0, grid="small")  # doctest: +SKIP

See :mod:`pipeline.simulate.dataset` and ``pipeline/simulate/README.md``.
"""

from pipeline.simulate.dataset import PRESETS, simulate_dataset

__all__ = ["PRESETS", "simulate_dataset"]
