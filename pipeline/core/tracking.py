"""Lesion tracking over sessions: persistent lesion ids, lineage and events.

All arrays of one subject are on one grid (the subject space). A lesion is a connected
component of a session's binary mask. Components of consecutive *observed* sessions are linked
by overlap (see :func:`overlap_links`); the connected components of the bipartite link graph of
one interval are the *groups* that define what happened:

=========  ==========================  ===========================================
group      meaning                     ids
=========  ==========================  ===========================================
1:1        continuing                  the component at t+1 keeps the id
1:0        resolved                    the id ends at t
0:1        new                         new id, origin ``new``
n:1        merged (n >= 2)             NEW id, origin ``merge``, parents = the n ids
1:m        split (m >= 2)              m NEW ids, origin ``split``, parent = the one id
n:m        merged and split            m NEW ids, origin ``split``, parents = all n ids
=========  ==========================  ===========================================

Fragments: within a group, a component smaller than ``fragment_ratio`` times the largest
component on its side of the group is a *fragment*. A group with exactly one non-fragment
component on each side is a continuation of that lesion (it keeps its id and gets a volume
event); the fragments stay explicit in the lineage: a fragment at t ends with event/fate
``merged`` and the continuing id in ``children``/``successor_ids``; a fragment at t+1 is a new
id with origin ``split`` and the continuing id as parent. The continuing id's event row lists
those fragment ids in ``predecessor_ids``/``successor_ids``. So a large lesion that absorbs or
sheds a one-voxel speck is not reported as merged or split.

Unobserved sessions (``observed`` False: the contrast was not acquired) are bridged: their
masks are ignored, intervals join consecutive observed sessions (no event into or out of an
unobserved session) and lesions keep their ids across them.

Conventions
-----------
* A merge never re-uses a parent's id: every id denotes one connected component per session
  over one contiguous run of observed sessions, so a lesion's volume series never jumps
  because another lesion (other than a fragment) joined it. The lineage table records parents
  and children explicitly.
* An id that disappears is never revived: a lesion that resolves and reappears at the same
  place (with a gap of one or more observed sessions) gets a new id.
* Ids are 1..N, assigned session by session; within a session new ids are ordered by
  decreasing volume, then by the (permutation-invariant) coordinate sums of the component,
  then by its lowest C-order flat index. Ids therefore do not depend on the memory layout of
  the input arrays and are unchanged by transposing every mask the same way (except for exact
  geometric ties).
* In an n:m group the ending parents get the event ``merged`` and the new pieces ``split``
  (their ``parents``/``predecessor_ids`` list all n parents).
* The ``dseg`` arrays of the result are read-only (the result is a frozen value); they are all
  zero at unobserved sessions.
* Events are one row per lesion id per interval (between consecutive observed sessions) in
  which the id exists at either end; volumes are always the id's *own* volume (0 where it does
  not exist), so per interval the sum of ``volume_from_ml`` is the mask volume at
  ``from_session`` and the sum of ``volume_to_ml`` is the mask volume at ``to_session``.
  ``predecessor_ids``/``successor_ids`` name the other ids of a merge or split (or the
  fragments a continuing id absorbed or shed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.core.boxes import bounding_box

EVENTS = ("new", "enlarging", "stable", "shrinking", "resolved", "merged", "split")
ORIGINS = ("baseline", "new", "merge", "split")
FATES = ("present", "resolved", "merged", "split")

_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}
_LINK_COLUMNS = [
    "from_label",
    "to_label",
    "overlap_voxels",
    "tolerant_overlap_voxels",
    "via_tolerance",
]


def label_components(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Connected components of a 3D binary mask.

    Parameters
    ----------
    mask : ndarray, 3D
        Binary lesion mask (any dtype; non-zero is lesion).
    connectivity : {6, 18, 26}
        3D neighbourhood: faces, faces+edges, or faces+edges+corners.

    Returns
    -------
    ndarray of int32
        0 for background, 1..n for the components (scipy raster order).
    """
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, got {mask.ndim} dimensions")
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])
    labels, _ = ndimage.label(mask, structure=structure)
    return labels.astype(np.int32, copy=False)


def _component_stats(labels: np.ndarray, n: int,
                     index_offset: Sequence[int] = (0, 0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Volumes (voxels) of labels 1..n and their canonical order (0-based label indices).

    Order: decreasing volume, then increasing total coordinate sum, then the sorted per-axis
    coordinate sums (both invariant under axis permutation), then lowest C-order flat index.
    Coordinates are those of the whole grid when ``labels`` is a crop of it starting at
    ``index_offset`` (the C-order comparison is the same on the crop).
    """
    idx = np.nonzero(labels)
    lab = labels[idx]
    volume = np.bincount(lab, minlength=n + 1)[1:].astype(np.int64)
    if n == 0:
        return volume, np.zeros(0, np.int64)
    axis_sums = np.stack(
        [np.bincount(lab, weights=c, minlength=n + 1)[1:] for c in idx], axis=1
    ).astype(np.int64)  # exact: integer sums far below 2**53
    axis_sums += volume[:, None] * np.asarray(index_offset, np.int64)[None, :]
    axis_sorted = np.sort(axis_sums, axis=1)
    flat = np.ravel_multi_index(idx, labels.shape)  # C order, ascending (np.nonzero order)
    first_flat = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first_flat, lab - 1, flat)
    keys = [first_flat] + [axis_sorted[:, k] for k in range(axis_sorted.shape[1] - 1, -1, -1)]
    keys += [axis_sums.sum(axis=1), -volume]
    return volume, np.lexsort(keys)


def _dilated_hits(
    src: np.ndarray, dst: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every component i of ``src`` dilated by a cube of half-width ``radius``: the number
    of voxels of every component j of ``dst`` inside it. Returns (i, j, count) arrays."""
    structure = np.ones((2 * radius + 1,) * src.ndim, bool)
    rows_i, rows_j, counts = [], [], []
    for i, sl in enumerate(ndimage.find_objects(src), start=1):
        if sl is None:
            continue
        box = tuple(
            slice(max(s.start - radius, 0), min(s.stop + radius, dim))
            for s, dim in zip(sl, src.shape)
        )
        comp = ndimage.binary_dilation(src[box] == i, structure=structure)
        hits = dst[box][comp]
        hits = hits[hits > 0]
        if hits.size:
            j, c = np.unique(hits, return_counts=True)
            rows_i.append(np.full(j.size, i, np.int64))
            rows_j.append(j.astype(np.int64))
            counts.append(c.astype(np.int64))
    if not counts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return np.concatenate(rows_i), np.concatenate(rows_j), np.concatenate(counts)


def overlap_links(
    labels_from: np.ndarray,
    labels_to: np.ndarray,
    *,
    min_overlap_voxels: int,
    shift_tolerance_voxels: int,
) -> pd.DataFrame:
    """Links between the components of two consecutive sessions.

    Two rules, applied in order:

    1. *Direct overlap*: components ``a`` (session t) and ``b`` (session t+1) are linked when
       they share at least ``min(min_overlap_voxels, volume(a), volume(b))`` voxels (so a
       lesion smaller than the threshold can still be matched when it lies wholly inside).
    2. *Shift tolerance*, only between components that rule 1 left unmatched on both sides
       (each would otherwise be "resolved" and "new"): the tolerant overlap is
       ``max(|dilate(a) & b|, |a & dilate(b)|)`` with a cube of half-width
       ``shift_tolerance_voxels``; the pair is linked when it reaches the same threshold.
       Restricting the tolerance to otherwise unmatched components absorbs a one-voxel
       registration shift without linking two nearby distinct lesions that each have their
       own direct match (e.g. one shrinks away from the gap while its neighbour grows into it).

    Parameters
    ----------
    labels_from, labels_to : ndarray of int, same shape
        Component labels (0 background) of sessions t and t+1.
    min_overlap_voxels : int
        Minimum overlap (voxels) of a link.
    shift_tolerance_voxels : int
        Dilation half-width (voxels) of rule 2; 0 disables rule 2.

    Returns
    -------
    DataFrame
        One row per link: ``from_label``, ``to_label``, ``overlap_voxels`` (direct),
        ``tolerant_overlap_voxels``, ``via_tolerance`` (bool); sorted by labels.
    """
    la = np.asarray(labels_from)
    lb = np.asarray(labels_to)
    if la.shape != lb.shape:
        raise ValueError(f"label arrays differ in shape: {la.shape} vs {lb.shape}")
    if min_overlap_voxels < 1:
        raise ValueError("min_overlap_voxels must be at least 1")
    if shift_tolerance_voxels < 0:
        raise ValueError("shift_tolerance_voxels must not be negative")
    na, nb = int(la.max(initial=0)), int(lb.max(initial=0))
    if na == 0 or nb == 0:
        return _empty_links()
    vol_a = np.bincount(la.ravel(), minlength=na + 1)
    vol_b = np.bincount(lb.ravel(), minlength=nb + 1)
    stride = np.int64(nb + 1)

    both = (la > 0) & (lb > 0)
    raw_key, raw_count = np.unique(
        la[both].astype(np.int64) * stride + lb[both], return_counts=True
    )
    keys = [raw_key]
    tol_keys = tol_vals = np.zeros(0, np.int64)
    if shift_tolerance_voxels > 0:
        i, j, c = _dilated_hits(la, lb, shift_tolerance_voxels)
        j2, i2, c2 = _dilated_hits(lb, la, shift_tolerance_voxels)
        tol_keys = np.concatenate([i * stride + j, i2 * stride + j2])
        tol_vals = np.concatenate([c, c2])
        keys.append(tol_keys)
    all_keys = np.unique(np.concatenate(keys))
    raw = np.zeros(all_keys.size, np.int64)
    raw[np.searchsorted(all_keys, raw_key)] = raw_count
    tolerant = raw.copy()
    if tol_keys.size:
        np.maximum.at(tolerant, np.searchsorted(all_keys, tol_keys), tol_vals)

    a, b = all_keys // stride, all_keys % stride
    threshold = np.minimum(min_overlap_voxels, np.minimum(vol_a[a], vol_b[b]))
    direct = raw >= threshold
    matched_a = np.zeros(na + 1, bool)
    matched_b = np.zeros(nb + 1, bool)
    matched_a[a[direct]] = True
    matched_b[b[direct]] = True
    rescued = (
        (shift_tolerance_voxels > 0)
        & ~direct
        & (tolerant >= threshold)
        & ~matched_a[a]
        & ~matched_b[b]
    )
    keep = direct | rescued
    return pd.DataFrame(
        {
            "from_label": a[keep].astype(np.int64),
            "to_label": b[keep].astype(np.int64),
            "overlap_voxels": raw[keep],
            "tolerant_overlap_voxels": tolerant[keep],
            "via_tolerance": rescued[keep],
        }
    )


def _empty_links() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "from_label": np.zeros(0, np.int64),
            "to_label": np.zeros(0, np.int64),
            "overlap_voxels": np.zeros(0, np.int64),
            "tolerant_overlap_voxels": np.zeros(0, np.int64),
            "via_tolerance": np.zeros(0, bool),
        }
    )


def link_groups(n_from: int, n_to: int, links: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """Connected components of the bipartite link graph of one interval.

    Returns a list of ``(from_labels, to_labels)`` pairs (sorted label arrays; either may be
    empty for a resolved or new lesion), covering every label 1..n_from and 1..n_to once.
    """
    n = n_from + n_to
    if n == 0:
        return []
    rows = links["from_label"].to_numpy(np.int64) - 1
    cols = links["to_label"].to_numpy(np.int64) - 1 + n_from
    graph = coo_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    groups = []
    for members in np.split(order, bounds):
        groups.append((members[members < n_from] + 1, members[members >= n_from] - n_from + 1))
    return groups


@dataclass(frozen=True)
class TrackingResult:
    """Output of :func:`track_lesions`.

    Attributes
    ----------
    dseg : tuple of ndarray (int32)
        Per session, the persistent lesion id of every voxel (0 background).
    lineage : DataFrame
        One row per lesion id (columns: :data:`pipeline.core.columns.LINEAGE_COLUMNS`).
    events : DataFrame
        One row per lesion id per interval (:data:`pipeline.core.columns.EVENT_COLUMNS`).
    links : DataFrame
        The overlap graph in ids: ``from_session``, ``to_session``, ``from_id``, ``to_id``,
        ``overlap_voxels``, ``tolerant_overlap_voxels``, ``via_tolerance`` (for QC).
    days : tuple of float
        Day of every session.
    sessions : tuple
        Session labels (the indices 0..T-1 when none were given).
    observed : tuple of bool
        Per session, whether its mask was observed (unobserved sessions are bridged).
    """

    dseg: tuple[np.ndarray, ...]
    lineage: pd.DataFrame
    events: pd.DataFrame
    links: pd.DataFrame
    days: tuple[float, ...]
    sessions: tuple[Any, ...]
    observed: tuple[bool, ...]

    @property
    def n_lesions(self) -> int:
        """Number of distinct lesion ids over all sessions."""
        return len(self.lineage)


def _exceeds(value: float, threshold: float) -> bool:
    """``value > threshold``, with values equal to the threshold up to float rounding
    counted as not exceeding it."""
    return bool(value > threshold + 1e-9 * max(1.0, abs(threshold)))


def classify_change(
    volume_from_ml: float,
    volume_to_ml: float,
    *,
    enlarging_relative: float,
    enlarging_absolute_ml: float,
) -> str:
    """``enlarging``, ``shrinking`` or ``stable`` for a lesion present at both sessions.

    Enlarging needs BOTH a relative increase above ``enlarging_relative`` (fraction of
    ``volume_from_ml``) AND an absolute increase above ``enlarging_absolute_ml``; shrinking the
    same for a decrease. A change exactly at a threshold is stable.
    """
    change = volume_to_ml - volume_from_ml
    if volume_from_ml <= 0:
        raise ValueError("classify_change needs a lesion present at the first session")
    relative = abs(change) / volume_from_ml
    if _exceeds(relative, enlarging_relative) and _exceeds(abs(change), enlarging_absolute_ml):
        return "enlarging" if change > 0 else "shrinking"
    return "stable"


def _join(ids: Sequence[int] | np.ndarray) -> str:
    return ";".join(str(int(i)) for i in sorted(int(i) for i in ids))


def majors(labels: np.ndarray, volumes: np.ndarray, fragment_ratio: float) -> np.ndarray:
    """The components of one side of a link group that are not fragments: volume at least
    ``fragment_ratio`` times the largest volume among ``labels`` (1-based)."""
    v = volumes[labels - 1]
    return labels[v >= fragment_ratio * v.max()]


def lesion_box(masks: Sequence[np.ndarray], shift_tolerance_voxels: int) -> tuple[slice, ...]:
    """The part of the subject grid that tracking and the ADC dynamics read: the bounding box of
    every voxel of ``masks`` grown by ``shift_tolerance_voxels`` + 1 (clipped to the grid); one
    voxel at the grid's corner when no mask has a voxel.

    Both are exact on it (with ``index_offset`` = the box's start, see :func:`track_lesions`):
    components and their overlaps lie inside, the shift-tolerant matching dilates by
    ``shift_tolerance_voxels``, and lesion cores are measured on each lesion's own padded box.
    """
    union = np.logical_or.reduce([np.asarray(m, bool) for m in masks])
    box = bounding_box(union, int(shift_tolerance_voxels) + 1)
    return box if box is not None else tuple(slice(0, 1) for _ in union.shape)


def track_lesions(
    masks: Sequence[np.ndarray],
    days: Sequence[float],
    *,
    connectivity: int,
    min_overlap_voxels: int,
    shift_tolerance_voxels: int,
    enlarging_relative: float,
    enlarging_absolute_ml: float,
    voxel_volume_ml: float,
    fragment_ratio: float = 0.0,
    sessions: Sequence[Any] | None = None,
    observed: Sequence[bool] | None = None,
    index_offset: Sequence[int] = (0, 0, 0),
) -> TrackingResult:
    """Persistent lesion ids, lineage and per-interval events over a subject's sessions.

    Parameters
    ----------
    masks : sequence of 3D ndarray
        Binary lesion masks of every session, in time order, all on the subject grid.
    days : sequence of float
        Day of every session (strictly increasing).
    connectivity : {6, 18, 26}
        Neighbourhood defining a lesion component.
    min_overlap_voxels, shift_tolerance_voxels : int
        Matching parameters, see :func:`overlap_links`.
    enlarging_relative : float
        Relative volume change (fraction) that must be exceeded for enlarging/shrinking.
    enlarging_absolute_ml : float
        Absolute volume change (mL) that must also be exceeded.
    voxel_volume_ml : float
        Volume of one voxel (mL).
    fragment_ratio : float
        A component smaller than this fraction of the largest component on its side of a link
        group is a fragment and does not make a merge or split (see the module docstring);
        0 (default) treats every component as a lesion of its own.
    sessions : sequence, optional
        Session labels used in the tables; default the session indices 0..T-1.
    observed : sequence of bool, optional
        Per session, whether the contrast of ``masks`` was acquired; default all True. The
        masks of unobserved sessions are ignored and those sessions bridged (module docstring).
    index_offset : sequence of int
        When ``masks`` are a crop of the subject grid: the grid index of their first voxel,
        so that the lesion ids are those of the whole grid.

    Returns
    -------
    TrackingResult
        See the module docstring for the id, lineage and event conventions.
    """
    masks = [np.asarray(m) for m in masks]
    days_arr = np.asarray(days, float)
    n_sessions = len(masks)
    if n_sessions == 0:
        raise ValueError("no session masks given")
    if days_arr.shape != (n_sessions,):
        raise ValueError(f"{n_sessions} masks but {days_arr.size} days")
    if np.any(np.diff(days_arr) <= 0) or not np.all(np.isfinite(days_arr)):
        raise ValueError(f"days must be finite and strictly increasing, got {list(days_arr)}")
    if any(m.shape != masks[0].shape for m in masks):
        raise ValueError("all session masks must have the same shape (one subject grid)")
    if not voxel_volume_ml > 0:
        raise ValueError("voxel_volume_ml must be positive")
    if not 0.0 <= fragment_ratio <= 1.0:
        raise ValueError(f"fragment_ratio must be within [0, 1], got {fragment_ratio}")
    labels_s = tuple(sessions) if sessions is not None else tuple(range(n_sessions))
    if len(labels_s) != n_sessions:
        raise ValueError(f"{n_sessions} masks but {len(labels_s)} session labels")
    seen = [True] * n_sessions if observed is None else [bool(o) for o in observed]
    if len(seen) != n_sessions:
        raise ValueError(f"{n_sessions} masks but {len(seen)} observed flags")
    steps = [t for t in range(n_sessions) if seen[t]]  # the observed sessions, in time order

    labels = [
        label_components(m, connectivity) if seen[t] else np.zeros(m.shape, np.int32)
        for t, m in enumerate(masks)
    ]
    counts = [int(lab.max(initial=0)) for lab in labels]
    stats = [_component_stats(lab, n, index_offset) for lab, n in zip(labels, counts)]
    vols = [s[0] for s in stats]

    # per session: id of every label (index label-1)
    ids: list[np.ndarray] = [np.zeros(n, np.int64) for n in counts]
    lineage: dict[int, dict[str, Any]] = {}
    next_id = 1

    def new_lesion(t: int, origin: str, parents: Sequence[int]) -> int:
        nonlocal next_id
        lesion = next_id
        next_id += 1
        lineage[lesion] = {
            "origin": origin,
            "first": t,
            "last": t,
            "parents": sorted(int(p) for p in parents),
            "children": [],
            "fate": "present",
        }
        return lesion

    if steps:
        for lab_index in stats[steps[0]][1]:
            ids[steps[0]][lab_index] = new_lesion(steps[0], "baseline", [])

    event_rows: list[dict[str, Any]] = []
    link_frames: list[pd.DataFrame] = []
    for t, u in pairwise(steps):  # consecutive observed sessions
        links = overlap_links(
            labels[t],
            labels[u],
            min_overlap_voxels=min_overlap_voxels,
            shift_tolerance_voxels=shift_tolerance_voxels,
        )
        pending: dict[int, tuple[str, list[int]]] = {}  # to-label index -> (origin, parents)
        group_of_pending: list[tuple[np.ndarray, np.ndarray]] = []
        shed: dict[int, np.ndarray] = {}  # continuing id -> fragment labels split off at u
        absorbed: dict[int, list[int]] = {}  # continuing id -> fragment ids merged into it
        for a, b in link_groups(counts[t], counts[u], links):
            parent_ids = [int(i) for i in ids[t][a - 1]]
            if b.size == 0:
                for lesion in parent_ids:
                    lineage[lesion]["fate"] = "resolved"
                continue
            if a.size == 0:
                pending[int(b[0]) - 1] = ("new", [])
                continue
            major_a = majors(a, vols[t], fragment_ratio)
            major_b = majors(b, vols[u], fragment_ratio)
            if major_a.size == 1 and major_b.size == 1:  # one lesion continues (with fragments)
                lesion = int(ids[t][major_a[0] - 1])
                ids[u][major_b[0] - 1] = lesion
                lineage[lesion]["last"] = u
                absorbed[lesion] = [int(i) for i in ids[t][np.setdiff1d(a, major_a) - 1]]
                for fragment in absorbed[lesion]:
                    lineage[fragment]["fate"] = "merged"
                    lineage[fragment]["children"] = [lesion]
                shed[lesion] = np.setdiff1d(b, major_b)
                for j in shed[lesion]:
                    pending[int(j) - 1] = ("split", [lesion])
                continue
            origin = "merge" if b.size == 1 else "split"
            for j in b:
                pending[int(j) - 1] = (origin, parent_ids)
            group_of_pending.append((a, b))
        for lab_index in stats[u][1]:  # canonical order of this session's components
            if int(lab_index) in pending:
                origin, parents = pending[int(lab_index)]
                ids[u][lab_index] = new_lesion(u, origin, parents)
        for a, b in group_of_pending:
            child_ids = sorted(int(i) for i in ids[u][b - 1])
            for lesion in ids[t][a - 1]:
                lineage[int(lesion)]["children"] = child_ids
                lineage[int(lesion)]["fate"] = "merged" if a.size >= 2 else "split"
        fragments = {
            lesion: (_join(absorbed[lesion]), _join(ids[u][shed[lesion] - 1]))
            for lesion in absorbed
        }
        event_rows.extend(
            _interval_events(
                t,
                u,
                ids,
                vols,
                lineage,
                fragments,
                days=days_arr,
                voxel_volume_ml=voxel_volume_ml,
                enlarging_relative=enlarging_relative,
                enlarging_absolute_ml=enlarging_absolute_ml,
            )
        )
        if len(links):
            link_frames.append(
                pd.DataFrame(
                    {
                        "from_session": [labels_s[t]] * len(links),
                        "to_session": [labels_s[u]] * len(links),
                        "from_id": ids[t][links["from_label"].to_numpy() - 1],
                        "to_id": ids[u][links["to_label"].to_numpy() - 1],
                        "overlap_voxels": links["overlap_voxels"].to_numpy(),
                        "tolerant_overlap_voxels": links["tolerant_overlap_voxels"].to_numpy(),
                        "via_tolerance": links["via_tolerance"].to_numpy(),
                    }
                )
            )

    dseg = []
    for lab, id_map in zip(labels, ids):
        lut = np.concatenate([[0], id_map]).astype(np.int32)
        out = lut[lab]
        out.setflags(write=False)
        dseg.append(out)

    lineage_df = pd.DataFrame(
        [
            {
                "lesion_id": lesion,
                "origin": rec["origin"],
                "first_session": labels_s[rec["first"]],
                "first_day": float(days_arr[rec["first"]]),
                "last_session": labels_s[rec["last"]],
                "last_day": float(days_arr[rec["last"]]),
                "n_sessions": sum(seen[rec["first"] : rec["last"] + 1]),
                "parents": _join(rec["parents"]),
                "children": _join(rec["children"]),
                "fate": rec["fate"],
            }
            for lesion, rec in sorted(lineage.items())
        ],
        columns=[
            "lesion_id",
            "origin",
            "first_session",
            "first_day",
            "last_session",
            "last_day",
            "n_sessions",
            "parents",
            "children",
            "fate",
        ],
    )
    events_df = pd.DataFrame(event_rows, columns=list(_EVENT_KEYS))
    if len(events_df):
        events_df["from_session"] = [labels_s[i] for i in events_df["from_session"]]
        events_df["to_session"] = [labels_s[i] for i in events_df["to_session"]]
    links_df = (
        pd.concat(link_frames, ignore_index=True)
        if link_frames
        else pd.DataFrame(
            columns=[
                "from_session",
                "to_session",
                "from_id",
                "to_id",
                "overlap_voxels",
                "tolerant_overlap_voxels",
                "via_tolerance",
            ]
        )
    )
    return TrackingResult(
        dseg=tuple(dseg),
        lineage=lineage_df,
        events=events_df,
        links=links_df,
        days=tuple(float(d) for d in days_arr),
        sessions=labels_s,
        observed=tuple(seen),
    )


_EVENT_KEYS = (
    "lesion_id",
    "from_session",
    "to_session",
    "from_day",
    "to_day",
    "event",
    "volume_from_ml",
    "volume_to_ml",
    "change_ml",
    "change_relative",
    "predecessor_ids",
    "successor_ids",
)


def _interval_events(
    t: int,
    u: int,
    ids: list[np.ndarray],
    vols: list[np.ndarray],
    lineage: dict[int, dict[str, Any]],
    fragments: dict[int, tuple[str, str]],
    *,
    days: np.ndarray,
    voxel_volume_ml: float,
    enlarging_relative: float,
    enlarging_absolute_ml: float,
) -> list[dict[str, Any]]:
    """Event rows of the interval between observed sessions t and u, one per id present at
    either end, sorted by id. ``fragments`` maps a continuing id to the ';'-joined ids of the
    fragments it absorbed and shed in this interval."""
    vol_from = {int(i): float(v) * voxel_volume_ml for i, v in zip(ids[t], vols[t])}
    vol_to = {int(i): float(v) * voxel_volume_ml for i, v in zip(ids[u], vols[u])}
    rows = []
    for lesion in sorted(set(vol_from) | set(vol_to)):
        rec = lineage[lesion]
        v0, v1 = vol_from.get(lesion, 0.0), vol_to.get(lesion, 0.0)
        pred, succ = "", ""
        if lesion in vol_from and lesion in vol_to:
            event = classify_change(
                v0,
                v1,
                enlarging_relative=enlarging_relative,
                enlarging_absolute_ml=enlarging_absolute_ml,
            )
            pred, succ = fragments.get(lesion, ("", ""))
        elif lesion in vol_to:  # born at u
            event = {"new": "new", "merge": "merged", "split": "split"}[rec["origin"]]
            pred = _join(rec["parents"])
        else:  # ends at t
            event = rec["fate"]
            succ = _join(rec["children"])
        rows.append(
            {
                "lesion_id": lesion,
                "from_session": t,
                "to_session": u,
                "from_day": float(days[t]),
                "to_day": float(days[u]),
                "event": event,
                "volume_from_ml": v0,
                "volume_to_ml": v1,
                "change_ml": v1 - v0,
                "change_relative": (v1 - v0) / v0 if v0 > 0 else np.nan,
                "predecessor_ids": pred,
                "successor_ids": succ,
            }
        )
    return rows
