"""Segmentation and change-detection metrics (lesion segmentation challenge definitions).

All masks are boolean-like numpy arrays on one grid; ``spacing_mm`` is given in the SAME axis
order as the arrays.

Empty masks
-----------
* :func:`dice`: two empty masks agree perfectly, 1.0; one empty, 0.0.
* :func:`hausdorff95`: NaN when either mask is empty (no surface to measure from).
* :func:`absolute_volume_difference_percent`: 0.0 when both are empty, NaN when only the truth
  is empty (the difference is relative to the truth volume).
* :func:`lesion_wise_detection`: recall is NaN without truth lesions, precision is NaN without
  predicted lesions, except that both empty gives recall = precision = F1 = 1.0; F1 is 0.0 when
  exactly one side is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.core.distance import edt_mm

_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def _pair(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(truth, bool), np.asarray(pred, bool)
    if t.shape != p.shape:
        raise ValueError(f"truth shape {t.shape} differs from prediction shape {p.shape}")
    return t, p


def structure(connectivity: int, ndim: int = 3) -> np.ndarray:
    """Structuring element for 6-, 18- or 26-connectivity of a 3D array."""
    if ndim != 3 or connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(
            f"connectivity must be 6, 18 or 26 on a 3D array, got {connectivity} on {ndim}D"
        )
    return ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice similarity coefficient ``2|T & P| / (|T| + |P|)``; 1.0 for two empty masks."""
    t, p = _pair(truth, pred)
    total = int(t.sum()) + int(p.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(t & p)) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: in the mask with a face neighbour outside it (array edge is outside)."""
    inner = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1),
                                   border_value=0)
    return mask & ~inner


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing_mm: tuple[float, ...]
) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    sa, sb = _surface(np.asarray(a, bool)), _surface(np.asarray(b, bool))
    dist_to_b = edt_mm(~sb, spacing_mm)
    return dist_to_b[sa]


def hausdorff95(truth: np.ndarray, pred: np.ndarray, spacing_mm: tuple[float, ...]) -> float:
    """95th-percentile symmetric Hausdorff distance between mask surfaces (mm).

    The 95th percentile of the pooled directed surface distances truth->prediction and
    prediction->truth (the MedPy ``hd95`` definition used by ISLES and MSSEG evaluations).
    Surface voxels are mask voxels with a face neighbour outside the mask; distances use
    Euclidean distance transforms with ``spacing_mm``. NaN when either mask is empty.
    """
    t, p = _pair(truth, pred)
    if len(spacing_mm) != t.ndim:
        raise ValueError(f"spacing_mm {spacing_mm} does not match a {t.ndim}D array")
    if not t.any() or not p.any():
        return float("nan")
    d = np.concatenate([surface_distances(t, p, spacing_mm), surface_distances(p, t, spacing_mm)])
    return float(np.percentile(d, 95))


def absolute_volume_difference_percent(truth: np.ndarray, pred: np.ndarray) -> float:
    """``|V_pred - V_truth| / V_truth * 100`` (percent of the truth volume).

    0.0 when both masks are empty, NaN when only the truth is empty.
    """
    t, p = _pair(truth, pred)
    vt, vp = int(t.sum()), int(p.sum())
    if vt == 0:
        return 0.0 if vp == 0 else float("nan")
    return abs(vp - vt) / vt * 100.0


@dataclass(frozen=True)
class Detection:
    """Lesion-wise detection counts and scores."""

    n_truth: int  #: connected components in the truth
    n_pred: int  #: connected components in the prediction
    truth_detected: int  #: truth lesions overlapped by the prediction on >= 1 voxel
    pred_correct: int  #: predicted lesions overlapping a truth lesion on >= 1 voxel
    recall: float
    precision: float
    f1: float


def lesion_wise_detection(
    truth: np.ndarray, pred: np.ndarray, connectivity: int = 26
) -> Detection:
    """Lesion-wise recall, precision and F1.

    A truth lesion (connected component) is detected when at least one of its voxels is in the
    prediction; a predicted lesion is a true positive when at least one of its voxels is in the
    truth. Recall = detected truth lesions / truth lesions; precision = true-positive predicted
    lesions / predicted lesions; F1 is their harmonic mean. See the module docstring for empty
    masks.
    """
    t, p = _pair(truth, pred)
    st = structure(connectivity, t.ndim)
    lt, nt = ndimage.label(t, st)
    lp, np_ = ndimage.label(p, st)
    hit_t = np.unique(lt[t & p])
    hit_p = np.unique(lp[t & p])
    det_t, det_p = int(hit_t.size), int(hit_p.size)
    if nt == 0 and np_ == 0:
        return Detection(0, 0, 0, 0, 1.0, 1.0, 1.0)
    recall = det_t / nt if nt else float("nan")
    precision = det_p / np_ if np_ else float("nan")
    if nt == 0 or np_ == 0 or recall + precision == 0:
        f1 = 0.0
    else:
        f1 = 2.0 * recall * precision / (recall + precision)
    return Detection(int(nt), int(np_), det_t, det_p, recall, precision, f1)


@dataclass(frozen=True)
class ChangeDetection:
    """Agreement of a predicted change mask (e.g. new/enlarging lesion voxels) with the truth."""

    voxel_recall: float  #: fraction of truth change voxels predicted (NaN for empty truth)
    false_positive_volume_mm3: float  #: predicted change volume outside the truth change
    lesion_recall: float  #: fraction of truth change components hit on >= 1 voxel
    lesion_precision: float  #: fraction of predicted change components hitting the truth
    n_truth_lesions: int
    n_pred_lesions: int


def change_voxel_recall(truth_change: np.ndarray, pred_change: np.ndarray) -> float:
    """Fraction of truth change voxels inside the predicted change; NaN for an empty truth."""
    t, p = _pair(truth_change, pred_change)
    n = int(t.sum())
    return float(np.count_nonzero(t & p)) / n if n else float("nan")


def false_positive_change_volume_mm3(
    truth_change: np.ndarray, pred_change: np.ndarray, voxel_volume_mm3: float
) -> float:
    """Volume of predicted change voxels outside the truth change (mm^3)."""
    t, p = _pair(truth_change, pred_change)
    return float(np.count_nonzero(p & ~t)) * float(voxel_volume_mm3)


def change_detection(
    truth_change: np.ndarray,
    pred_change: np.ndarray,
    voxel_volume_mm3: float,
    connectivity: int = 26,
) -> ChangeDetection:
    """Voxel- and lesion-wise agreement of change masks (new or enlarging lesion voxels)."""
    det = lesion_wise_detection(truth_change, pred_change, connectivity)
    return ChangeDetection(
        voxel_recall=change_voxel_recall(truth_change, pred_change),
        false_positive_volume_mm3=false_positive_change_volume_mm3(
            truth_change, pred_change, voxel_volume_mm3
        ),
        lesion_recall=det.recall,
        lesion_precision=det.precision,
        n_truth_lesions=det.n_truth,
        n_pred_lesions=det.n_pred,
    )
