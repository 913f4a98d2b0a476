"""Image figures: the Figure-1-style mosaic and the registration QC overlays.

Images are shown in radiological convention (patient right on the viewer's left, anterior up),
the way the case report's Figure 1 shows them. All sessions are in one within-subject space, so
the same slice index cuts the same anatomy in every session.

Volumes are read once each and only the displayed slices are kept (:func:`extract_views`), so a
report over many sessions needs little memory and time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from skimage.feature import canny

from pipeline.reports.data import SessionFiles, SubjectDerivatives, events_of_kind, growing_ids

EXISTING_COLOUR = "#35c4ff"
GROWING_COLOUR = "#ff8c00"  # the case report marks new or progressive lesions in orange
EDGE_COLOUR = (1.0, 0.15, 0.85)
COLUMNS = (("dwi", "DWI (trace)", "restricted"), ("adc", "ADC", "restricted"),
           ("flair", "FLAIR", "flair"))
KINDS = ("flair", "restricted")
HEADROOM = {"dwi": 1.6, "flair": 1.6}  # white level >= this multiple of the brain median
AXIAL_KEYS = ("dwi", "adc", "flair", "brain")  # the images of which the axial slice is shown
QC_KEYS = ("dwi", "flair")  # the images of the registration QC (three cuts each)


def axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS volume as a display array (rows anterior-up, radiological)."""
    return volume[::-1, :, k].T


def coronal(volume: np.ndarray, j: int) -> np.ndarray:
    """Coronal slice ``j`` of a RAS volume (rows superior-up, radiological)."""
    return volume[::-1, j, :].T


def sagittal(volume: np.ndarray, i: int) -> np.ndarray:
    """Sagittal slice ``i`` of a RAS volume (rows superior-up, anterior on the right)."""
    return volume[i, :, :].T


def lesion_slice(masks: list[np.ndarray | None], brain: np.ndarray | None = None) -> int:
    """Axial index with the most lesion voxels summed over all sessions.

    Parameters
    ----------
    masks : list of arrays or None
        Lesion masks (or dseg images) of every session, RAS, same grid.
    brain : array, optional
        A brain mask used when there is no lesion at all: its central axial slice.

    Returns
    -------
    int
        The axial slice index (the middle of the volume when nothing is known).
    """
    counts = [(m > 0).sum(axis=(0, 1)) for m in masks if m is not None]
    return best_slice(np.sum(counts, axis=0) if counts else None, brain)


def best_slice(counts: np.ndarray | None, brain: np.ndarray | None) -> int:
    """Index of the largest lesion count; else the brain's central axial slice; else the middle."""
    if counts is not None and counts.max() > 0:
        return int(np.argmax(counts))
    if brain is not None and brain.any():
        return int(round(mask_centre(brain > 0)[2]))
    return int(len(counts) // 2) if counts is not None else (brain.shape[2] // 2 if brain is not
                                                             None else 0)


def mask_centre(mask: np.ndarray) -> tuple[float, ...]:
    """Centre of mass of a non-empty boolean mask (index units, per axis).

    The values of ``scipy.ndimage.center_of_mass`` (its float sums of integer indices are exact
    below 2**53), from per-axis voxel counts: no float image of the whole volume per axis
    (0.02 instead of 0.26 s on a 196x223x192 brain mask).
    """
    n = int(np.count_nonzero(mask))
    centre = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        counts = np.count_nonzero(mask, axis=others).astype(np.int64)
        centre.append(float(counts @ np.arange(mask.shape[axis], dtype=np.int64)) / n)
    return tuple(centre)


def crop_box(mask2d: np.ndarray | None, shape: tuple[int, int], margin: int = 4):
    """Row/column slices around the non-zero part of ``mask2d`` (whole image when empty)."""
    if mask2d is None or not mask2d.any():
        return slice(0, shape[0]), slice(0, shape[1])
    rows, cols = np.nonzero(mask2d)
    return (slice(max(rows.min() - margin, 0), min(rows.max() + margin + 1, shape[0])),
            slice(max(cols.min() - margin, 0), min(cols.max() + margin + 1, shape[1])))


def display_window(slices: list[np.ndarray | None], masks: list[np.ndarray | None] | None = None,
                   percentiles=(1.0, 99.5), headroom: float = 0.0) -> tuple[float, float]:
    """Grey-level window shared by all sessions: percentiles of the (brain) pixels shown.

    ``headroom`` > 0 keeps the white level at least that multiple of the median, so normal
    tissue stays grey on DWI and FLAIR when no lesion is bright (the clinical look).
    """
    values = []
    for i, image in enumerate(slices):
        if image is None:
            continue
        mask = masks[i] if masks and i < len(masks) and masks[i] is not None else image != 0
        picked = image[mask > 0] if np.any(mask) else image.ravel()
        values.append(picked[np.isfinite(picked)])
    values = [v for v in values if v.size]
    if not values:
        return 0.0, 1.0
    values = np.concatenate(values)
    lo, hi = np.percentile(values, percentiles)
    lo = min(lo, 0.0) if values.min() >= 0 else lo  # magnitude images: black is zero signal
    hi = max(hi, headroom * float(np.median(values)))
    return float(lo), float(hi if hi > lo else lo + 1.0)


@dataclass
class SessionViews:
    """The slices of one session that the figures show (None where the image is missing)."""

    label: str
    day: float
    axial: dict[str, np.ndarray | None] = field(default_factory=dict)
    qc: dict[str, tuple[np.ndarray, ...] | None] = field(default_factory=dict)


@dataclass
class SubjectViews:
    """Displayed slices of every session, at one set of slice indices."""

    k: int
    centre: tuple[int, int]
    sessions: list[SessionViews]


def _labels(session: SessionFiles, kind: str) -> np.ndarray | None:
    """Lesion ids (else the lesion mask) in the smallest integer type that holds them: the
    volumes of every session are kept until the slice is chosen (8 sessions of int32 dseg at
    1 mm would hold 0.5 GB)."""
    labels = session.load(f"{kind}_dseg", dtype=None)
    if labels is None:
        labels = session.load(f"{kind}_mask", dtype=None)
    if labels is None:
        return None
    labels = np.rint(labels) if labels.dtype.kind == "f" else labels
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    return labels.astype(np.promote_types(np.min_scalar_type(low), np.min_scalar_type(high)))


def _lesion_counts(subject: SubjectDerivatives) -> tuple[np.ndarray | None, dict]:
    """Axial lesion counts over all sessions and the label volumes (compact integer type)."""
    counts, labels = None, {}
    for session in subject.sessions:
        for kind in KINDS:
            volume = _labels(session, kind)
            labels[session.label, kind] = volume
            if volume is not None:
                c = (volume > 0).sum(axis=(0, 1))
                counts = c if counts is None else counts + c
    return counts, labels


def _centre(brain: np.ndarray | None, shape: tuple[int, ...] | None) -> tuple[int, int]:
    """(i, j) of the brain's centre of mass (the volume centre without a mask)."""
    if brain is not None and brain.any():
        ci, cj, _ = mask_centre(brain > 0)
        return int(round(ci)), int(round(cj))
    return (shape[0] // 2, shape[1] // 2) if shape else (0, 0)


def _session_views(session: SessionFiles, labels: dict, k: int, centre) -> SessionViews:
    views = SessionViews(label=session.label, day=session.day)
    for key in AXIAL_KEYS:
        volume = session.load(key)
        views.axial[key] = None if volume is None else axial(volume, k)
        if key in QC_KEYS:
            views.qc[key] = None if volume is None else (
                axial(volume, k), coronal(volume, centre[1]), sagittal(volume, centre[0]))
    for kind in KINDS:
        volume = labels.get((session.label, kind))
        views.axial[f"{kind}_labels"] = None if volume is None else axial(volume, k).astype(np.int32)
    return views


def extract_views(subject: SubjectDerivatives) -> SubjectViews:
    """Read every volume once and keep the slices the mosaic and the QC figure show.

    The axial slice is the one with the most lesion (FLAIR and restricted) over all sessions;
    coronal and sagittal QC slices pass through the centre of the first session's brain mask.

    Parameters
    ----------
    subject : SubjectDerivatives
        The subject's derivatives (see :func:`pipeline.reports.data.load_subject`).

    Returns
    -------
    SubjectViews
    """
    counts, labels = _lesion_counts(subject)
    first = subject.sessions[0] if subject.sessions else None
    brain = first.load("brain") if first else None
    k = best_slice(counts, brain)
    shape = brain.shape if brain is not None else next(
        (v.shape for v in labels.values() if v is not None), None)
    centre = _centre(brain, shape)
    sessions = [_session_views(s, labels, k, centre) for s in subject.sessions]
    return SubjectViews(k=k, centre=centre, sessions=sessions)


def save_views(views: SubjectViews, path: Path) -> None:
    """Write ``views`` to an ``.npz`` file (:func:`load_views` reads it back, slice for slice)."""
    arrays = {"k": np.array(views.k), "centre": np.array(views.centre),
              "labels": np.array([s.label for s in views.sessions], dtype=str),
              "days": np.array([s.day for s in views.sessions], dtype=float)}
    for i, session in enumerate(views.sessions):
        for key, image in session.axial.items():
            if image is not None:
                arrays[f"{i}/axial/{key}"] = image
        for key, cuts in session.qc.items():
            if cuts is not None:
                for c, cut in enumerate(cuts):
                    arrays[f"{i}/qc/{key}/{c}"] = cut
    np.savez(path, **arrays)


def load_views(path: Path) -> SubjectViews:
    """The :class:`SubjectViews` :func:`save_views` wrote (missing slices None again)."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    sessions = []
    for i, (label, day) in enumerate(zip(arrays["labels"], arrays["days"])):
        session = SessionViews(label=str(label), day=float(day))
        for key in (*AXIAL_KEYS, *(f"{kind}_labels" for kind in KINDS)):
            session.axial[key] = arrays.get(f"{i}/axial/{key}")
        for key in QC_KEYS:
            cuts = [arrays.get(f"{i}/qc/{key}/{c}") for c in range(3)]
            session.qc[key] = None if cuts[0] is None else tuple(cuts)
        sessions.append(session)
    return SubjectViews(k=int(arrays["k"]), centre=tuple(int(c) for c in arrays["centre"]),
                        sessions=sessions)


def with_lesion_ids(views: SubjectViews, subject: SubjectDerivatives) -> SubjectViews:
    """``views`` (extracted while only the lesion masks existed) with each session's label
    slices taken from its lesion-id images (``<kind>_dseg``) at the same axial index, and the
    days and the order of ``subject``'s sessions.

    The slice index stays valid: a lesion-id image is non-zero exactly on its mask
    (:func:`pipeline.core.tracking.track_lesions` gives every component of an observed
    session's mask an id > 0; an unobserved session's image is all zero, as is the mask the
    segmentation wrote for it), so the lesion counts of :func:`extract_views` are the same.
    A session without a lesion-id image keeps its mask slice (as :func:`extract_views` does).
    """
    by_label = {s.label: s for s in views.sessions}
    sessions = []
    for files in subject.sessions:
        stored = by_label[files.label]
        session = SessionViews(label=files.label, day=files.day, axial=dict(stored.axial),
                               qc=stored.qc)
        for kind in KINDS:
            ids = files.load(f"{kind}_dseg", dtype=None)
            if ids is not None:
                session.axial[f"{kind}_labels"] = axial(ids, views.k).astype(np.int32)
        sessions.append(session)
    return SubjectViews(k=views.k, centre=views.centre, sessions=sessions)


def _draw_contours(ax, labels2d: np.ndarray, growing: set[int]) -> None:
    """Contours of the lesion ids in a 2D label slice; growing ids in orange."""
    is_growing = np.isin(labels2d, list(growing)) if growing else np.zeros(labels2d.shape, bool)
    for mask, colour in (((labels2d > 0) & ~is_growing, EXISTING_COLOUR),
                         (is_growing, GROWING_COLOUR)):
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)


def _blank(ax, text: str | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    for spine in ax.spines.values():
        spine.set_visible(False)
    if text:
        ax.text(0.5, 0.5, text, color="white", ha="center", va="center", transform=ax.transAxes)


def _union_box(views: SubjectViews):
    brains = [s.axial.get("brain") for s in views.sessions if s.axial.get("brain") is not None]
    images = [s.axial[key] for s in views.sessions for key, _, _ in COLUMNS
              if s.axial.get(key) is not None]
    shape = images[0].shape if images else (1, 1)
    union = np.logical_or.reduce([b > 0 for b in brains]) if brains else None
    return crop_box(union, shape)


def _windows(views: SubjectViews) -> dict[str, tuple[float, float]]:
    brains = [s.axial.get("brain") for s in views.sessions]
    return {key: display_window([s.axial.get(key) for s in views.sessions], brains,
                                headroom=HEADROOM.get(key, 0.0))
            for key, _, _ in COLUMNS}


def _mosaic_panel(ax, session: SessionViews, column, window, box, events) -> None:
    key, title, kind = column
    image = session.axial.get(key)
    if image is None:
        _blank(ax, f"no {title}")
        return
    _blank(ax)
    rows, cols = box
    ax.imshow(image[rows, cols], cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
              interpolation="nearest")
    labels = session.axial.get(f"{kind}_labels")
    if labels is not None:
        grow = growing_ids(events_of_kind(events, kind), session.label)
        _draw_contours(ax, labels[rows, cols], grow)


def plot_mosaic(subject: SubjectDerivatives, views: SubjectViews | None = None,
                panel_in: float = 2.4) -> Figure:
    """Figure-1-style mosaic: one row per session, columns DWI, ADC and FLAIR.

    Lesion contours are drawn on one axial slice (the one with the most lesion over all
    sessions): restricted-diffusion lesions on DWI and ADC, FLAIR lesions on FLAIR. Lesions whose
    event in the interval ending at the row's session is new or enlarging are orange, the others
    blue.

    Parameters
    ----------
    subject : SubjectDerivatives
        The subject's derivatives (see :func:`pipeline.reports.data.load_subject`).
    views : SubjectViews, optional
        Slices already extracted (:func:`extract_views`); read from disk when omitted.
    panel_in : float
        Width of one panel in inches.

    Returns
    -------
    matplotlib.figure.Figure
        With the attribute ``lesion_slice`` (the axial index shown).
    """
    views = views or extract_views(subject)
    n = max(len(views.sessions), 1)
    box, windows = _union_box(views), _windows(views)
    aspect = (box[0].stop - box[0].start) / max(box[1].stop - box[1].start, 1)
    fig = Figure(figsize=(panel_in * 3 + 0.6, panel_in * aspect * n + 0.9), facecolor="black")
    axes = fig.subplots(n, 3, squeeze=False)
    events = subject.tables.get("events")
    for r, session in enumerate(views.sessions):
        for c, column in enumerate(COLUMNS):
            _mosaic_panel(axes[r, c], session, column, windows[column[0]], box, events)
            if r == 0:
                axes[r, c].set_title(column[1], color="white", fontsize=10)
        axes[r, 0].set_ylabel(f"Day {session.day:g}", color="white", fontsize=10)
        axes[r, 0].text(0.03, 0.97, "R", color="white", fontsize=8, va="top",
                        transform=axes[r, 0].transAxes)
    _mosaic_legend(fig)
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.07, right=0.99, top=1 - 0.35 / height, bottom=0.55 / height,
                        wspace=0.03, hspace=0.03)
    fig.lesion_slice = views.k
    return fig


def _mosaic_legend(fig: Figure) -> None:
    handles = [Line2D([], [], color=EXISTING_COLOUR, lw=2, label="lesion"),
               Line2D([], [], color=GROWING_COLOUR, lw=2, label="new or enlarging since the "
                      "previous session")]
    legend = fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=8)
    for text in legend.get_texts():
        text.set_color("white")


def flair_edges(flair2d: np.ndarray, sigma: float = 2.5) -> np.ndarray:
    """Strong Canny edges of a FLAIR slice (boolean): brain outline, ventricles, large lesions."""
    flair2d = np.nan_to_num(flair2d)
    lo, hi = np.percentile(flair2d, (1, 99.5))
    scaled = np.clip((flair2d - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return canny(scaled, sigma=sigma, low_threshold=0.08, high_threshold=0.16)


def _qc_panel(ax, dwi2d: np.ndarray, flair2d: np.ndarray, window: tuple[float, float]) -> None:
    _blank(ax)
    lo, hi = window
    ax.imshow(dwi2d, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
    edges = flair_edges(flair2d)
    overlay = np.zeros(edges.shape + (4,))
    overlay[edges] = (*EDGE_COLOUR, 1.0)
    ax.imshow(overlay, origin="lower", interpolation="nearest")


def plot_registration_qc(subject: SubjectDerivatives, views: SubjectViews | None = None,
                         panel_in: float = 2.2) -> Figure:
    """FLAIR edges over the aligned trace DWI: one row per session, axial/coronal/sagittal.

    Parameters
    ----------
    subject : SubjectDerivatives
        The subject's derivatives.
    views : SubjectViews, optional
        Slices already extracted (:func:`extract_views`); read from disk when omitted.
    panel_in : float
        Height of one panel in inches.

    Returns
    -------
    matplotlib.figure.Figure
    """
    views = views or extract_views(subject)
    n = max(len(views.sessions), 1)
    window = _windows(views)["dwi"]
    fig = Figure(figsize=(panel_in * 3.2, panel_in * n + 0.4), facecolor="black")
    axes = fig.subplots(n, 3, squeeze=False)
    for r, session in enumerate(views.sessions):
        dwi, flair = session.qc.get("dwi"), session.qc.get("flair")
        for c, name in enumerate(("axial", "coronal", "sagittal")):
            if dwi is None or flair is None:
                _blank(axes[r, c], "no DWI" if dwi is None else "no FLAIR")
            else:
                _qc_panel(axes[r, c], dwi[c], flair[c], window)
            if r == 0:
                axes[r, c].set_title(name, color="white", fontsize=10)
        axes[r, 0].set_ylabel(f"Day {session.day:g}", color="white", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.3 / fig.get_figheight(), bottom=0.01,
                        wspace=0.03, hspace=0.03)
    return fig
