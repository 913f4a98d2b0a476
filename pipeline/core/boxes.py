"""Bounding boxes of masks on a voxel grid.

Steps that only read voxels within a known distance of a mask (lesion growth, hole filling,
distance transforms, the segment and track nodes) work on the mask's bounding box grown by that
distance and paste their result back onto the whole grid: the same result, at the box's cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bounding_box(mask: np.ndarray, grow: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """Bounding box of the nonzero voxels of ``mask`` grown by ``grow`` voxels (one number, or
    one per axis), clipped to the array; None when ``mask`` has no voxel."""
    mask = np.asarray(mask, bool)
    grows = [int(grow)] * mask.ndim if np.isscalar(grow) else [int(g) for g in grow]
    box = []
    for axis, (n, g) in enumerate(zip(mask.shape, grows)):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - g, 0), min(int(hit[-1]) + g + 1, n)))
    return tuple(box)


def paste(values: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...], *,
          fill: float = 0, dtype: type | np.dtype | None = None) -> np.ndarray:
    """A ``shape`` array of ``dtype`` (default that of ``values``) holding ``fill`` outside
    ``box`` and ``values`` inside it."""
    values = np.asarray(values)
    full = np.full(shape, fill, values.dtype if dtype is None else dtype)
    full[box] = values
    return full
