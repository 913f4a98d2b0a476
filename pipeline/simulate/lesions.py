"""Lesion models of the presets: what every truth voxel does over time.

A model gives, for any day, a :class:`LesionState` on the truth grid:

* ``radc`` -- multiplier of the white-matter ADC (1 = normal; the seed case drops to a nadir of
  0.45-0.6 and recovers; MS-like plaques are mildly elevated);
* ``t2`` -- FLAIR/T2 lesion signal as a fraction of its plateau (0..1); the FLAIR and b0
  signals rise with it, and the FLAIR lesion mask is ``t2 >= 0.5`` in white matter
  (:data:`FLAIR_MASK_FRACTION`);
* ``owner`` -- the designed lesion object a voxel belongs to (0 none), used only to describe
  the design; lesion identities in the truth tables come from tracking the truth masks.

Seed case (daratumumab leukoencephalopathy, Steinegger et al. 2024, Figure 1): every deep white
matter voxel of the centrum semiovale gets an onset day that spreads from both parietal centra
semiovale toward the frontal white matter, the left hemisphere a few days ahead of the right.
After onset, rADC falls to its nadir within 1.5 days, stays low for about a week, then recovers
towards 1.0-1.15 with a 12-day time constant (pseudonormalization, overshoot in some voxels);
the FLAIR signal rises after a 3-day lag (3-day time constant) and persists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.simulate.anatomy import Anatomy

#: A truth voxel is FLAIR lesion when its lesion signal is at least this fraction of plateau.
FLAIR_MASK_FRACTION = 0.5
#: ... and its white-matter volume fraction is at least this.
FLAIR_MASK_MIN_WM = 0.5

# --- seed case: spread and time course (days, mm, ratios) ----------------------------------
SEED_CENTERS_RAS = {1: (-26.0, -46.0, 30.0), 2: (26.0, -46.0, 30.0)}  # left, right parietal CSO
SEED_START_DAY = {1: -6.0, 2: -1.5}  # onset day at the seed: left ahead of right
SPREAD_MM_PER_SQRT_DAY = 9.5  # front distance d = v * sqrt(t - t0): decelerating spread
SPREAD_JITTER_DAYS = 1.0  # smooth random jitter of onset days (SD)
TERRITORY_Z_MM = (14.0, 50.0)  # centrum semiovale slab (RAS z)
TERRITORY_MIN_ABS_X_MM = 9.0  # keep off the midline / corpus callosum
TERRITORY_MIN_WM = 0.6
TERRITORY_DEPTH_MM = 2.0  # deep white matter: at least this far from non-WM
HORIZON_DAYS = 80.0  # voxels with later onset never become lesion
NADIR_RANGE = (0.45, 0.60)
DROP_DAYS = 1.5
PLATEAU_DAYS_RANGE = (6.0, 8.0)
RECOVERY_TAU_DAYS = 12.0
OVERSHOOT_RANGE = (0.0, 0.2)  # recovery target 1 + overshoot
FLAIR_LAG_DAYS = 3.0
FLAIR_TAU_DAYS = 3.0

# --- MS-like: designed lesions (radius in mm at normalised time 0, 1/3, 2/3, 1) --------------
MS_RADC_PLATEAU = 1.25  # chronic MS plaques have a raised ADC (ratio to NAWM)
MS_DESIGN: tuple[dict, ...] = (
    {"id": 1, "center": (-30.0, -8.0, 18.0), "radii": (4.0, 4.0, 4.0, 4.0), "design": "stable"},
    {"id": 2, "center": (24.0, 22.0, 26.0), "radii": (3.5, 3.5, 3.5, 3.5), "design": "stable"},
    {"id": 3, "center": (30.0, -40.0, 28.0), "radii": (5.0, 5.0, 5.0, 5.0), "design": "stable"},
    {"id": 4, "center": (-22.0, 18.0, 30.0), "radii": (0.0, 0.0, 4.5, 4.5), "design": "new"},
    {"id": 5, "center": (-32.0, -40.0, 30.0), "radii": (3.0, 4.5, 6.0, 6.0),
     "design": "enlarging"},
    {"id": 6, "center": (28.0, 6.0, 18.0), "radii": (6.0, 5.0, 4.0, 3.5), "design": "shrinking"},
    {"id": 7, "center": (-24.0, 4.0, 12.0), "radii": (4.5, 3.5, 0.0, 0.0), "design": "resolving"},
    {"id": 8, "center": (-18.0, -20.0, 40.0), "radii": (3.5, 4.0, 6.5, 6.5), "design": "merging",
     "partner": 9, "offset": (0.0, 13.0, 0.0)},
    {"id": 9, "center": None, "radii": (3.5, 4.0, 6.5, 6.5), "design": "merging"},
    {"id": 10, "center": (20.0, -22.0, 40.0), "radii": (5.0, 5.0, 5.0, 5.0), "design": "splitting",
     "partner": 11, "offset": (0.0, 14.0, 0.0), "bridge": (3.5, 3.0, 0.0, 0.0)},
    {"id": 11, "center": None, "radii": (5.0, 5.0, 5.0, 5.0), "design": "splitting"},
)


@dataclass(frozen=True)
class LesionState:
    """Lesion state of every truth voxel at one day (see module docstring)."""

    radc: np.ndarray
    t2: np.ndarray
    owner: np.ndarray

    def flair_mask(self, anatomy: Anatomy) -> np.ndarray:
        """Truth FLAIR lesion mask: lesion signal >= 50 % of plateau in white matter."""
        return (self.t2 >= FLAIR_MASK_FRACTION) & (anatomy.wm >= FLAIR_MASK_MIN_WM)


class NoLesions:
    """Control preset: no lesion at any day."""

    design: tuple = ()

    def __init__(self, anatomy: Anatomy, rng: np.random.Generator) -> None:
        self.shape = anatomy.shape

    def state(self, day: float, index: int, n_sessions: int) -> LesionState:
        return LesionState(
            radc=np.ones(self.shape, np.float32),
            t2=np.zeros(self.shape, np.float32),
            owner=np.zeros(self.shape, np.int16),
        )


def _depth_mm(mask: np.ndarray, spacing: float) -> np.ndarray:
    return ndimage.distance_transform_edt(mask).astype(np.float32) * np.float32(spacing)


class SeedCaseLesions:
    """Seed-case leukoencephalopathy: onset spreading from both parietal centra semiovale."""

    design: tuple = ()

    def __init__(self, anatomy: Anatomy, rng: np.random.Generator) -> None:
        self.shape = anatomy.shape
        xyz = anatomy.world_coordinates()
        wm = anatomy.wm >= TERRITORY_MIN_WM
        deep = _depth_mm(wm, anatomy.spacing) >= TERRITORY_DEPTH_MM
        slab = (xyz[2] >= TERRITORY_Z_MM[0]) & (xyz[2] <= TERRITORY_Z_MM[1])
        territory = deep & slab & (np.abs(xyz[0]) >= TERRITORY_MIN_ABS_X_MM) & ~anatomy.ventricles
        jitter = ndimage.gaussian_filter(
            rng.standard_normal(self.shape).astype(np.float32), 4.0 / anatomy.spacing
        )
        jitter *= np.float32(SPREAD_JITTER_DAYS) / max(float(jitter.std()), 1e-6)
        onset = np.full(self.shape, np.inf, np.float32)
        owner = np.zeros(self.shape, np.int16)
        for lesion, center in SEED_CENTERS_RAS.items():
            side = (xyz[0] < 0) if lesion == 1 else (xyz[0] > 0)
            d = np.sqrt(sum((xyz[k] - center[k]) ** 2 for k in range(3)))
            t = SEED_START_DAY[lesion] + (d / SPREAD_MM_PER_SQRT_DAY) ** 2 + jitter
            hit = territory & side
            onset[hit] = t[hit]
            owner[hit] = lesion
        keep = onset <= HORIZON_DAYS
        self.index = np.flatnonzero(keep)
        self.onset = onset.ravel()[self.index]
        self.owner_flat = owner.ravel()[self.index]
        n = self.index.size
        self.nadir = rng.uniform(*NADIR_RANGE, n).astype(np.float32)
        self.plateau = rng.uniform(*PLATEAU_DAYS_RANGE, n).astype(np.float32)
        self.target = 1.0 + rng.uniform(*OVERSHOOT_RANGE, n).astype(np.float32)

    def radc_course(self, s: np.ndarray) -> np.ndarray:
        """rADC multiplier of the territory voxels ``s`` days after their onset."""
        n, p, target = self.nadir, self.plateau, self.target
        drop = 1.0 - (1.0 - n) * np.clip(s / DROP_DAYS, 0.0, 1.0)
        rec = n + (target - n) * (1.0 - np.exp(-np.maximum(s - p, 0.0) / RECOVERY_TAU_DAYS))
        out = np.where(s < p, drop, rec)
        return np.where(s < 0, 1.0, out).astype(np.float32)

    def state(self, day: float, index: int, n_sessions: int) -> LesionState:
        s = np.float32(day) - self.onset
        radc = np.ones(self.shape, np.float32)
        t2 = np.zeros(self.shape, np.float32)
        owner = np.zeros(self.shape, np.int16)
        radc.ravel()[self.index] = self.radc_course(s)
        rise = 1.0 - np.exp(-np.maximum(s - FLAIR_LAG_DAYS, 0.0) / FLAIR_TAU_DAYS)
        t2.ravel()[self.index] = rise.astype(np.float32)
        owner.ravel()[self.index] = np.where(s >= 0, self.owner_flat, 0)
        return LesionState(radc=radc, t2=t2, owner=owner)


def _radius_at(radii: tuple[float, ...], u: float) -> float:
    return float(np.interp(u, np.linspace(0.0, 1.0, len(radii)), radii))


class MSLikeLesions:
    """MS-like preset: FLAIR-only ovoid plaques that stay, appear, grow, shrink, resolve, merge
    and split (see :data:`MS_DESIGN`); no restricted diffusion."""

    def __init__(self, anatomy: Anatomy, rng: np.random.Generator) -> None:
        self.shape = anatomy.shape
        self.spacing = anatomy.spacing
        self.xyz = anatomy.world_coordinates()
        self.wm = anatomy.wm
        # snap each designed centre to nearby deep white matter of this subject
        deep = _depth_mm(anatomy.wm >= 0.5, anatomy.spacing) >= 4.0
        _, nearest = ndimage.distance_transform_edt(~deep, return_indices=True)
        inv = np.linalg.inv(anatomy.affine)
        centers: dict[int, np.ndarray] = {}
        for item in MS_DESIGN:
            if item["center"] is None:
                continue
            jitter = rng.uniform(-3.0, 3.0, 3)
            ijk = np.rint(inv[:3, :3] @ (np.asarray(item["center"]) + jitter) + inv[:3, 3])
            ijk = np.clip(ijk.astype(int), 0, np.asarray(self.shape) - 1)
            snapped = nearest[(slice(None), *ijk)]
            centers[item["id"]] = anatomy.affine[:3, :3] @ snapped + anatomy.affine[:3, 3]
            if "partner" in item:
                centers[item["partner"]] = centers[item["id"]] + np.asarray(item["offset"])
        self.centers = centers
        self.design = tuple(
            {"id": item["id"], "design": item["design"], "radii_mm": list(item["radii"]),
             "center_ras_mm": [round(float(v), 2) for v in centers[item["id"]]]}
            for item in MS_DESIGN
        )

    def _ball(self, center: np.ndarray, radius: float) -> np.ndarray:
        """Soft ball (1 inside, linear 1 mm edge); ovoid: 1.3x longer along RAS z."""
        if radius <= 0:
            return np.zeros(self.shape, np.float32)
        d = np.sqrt(
            (self.xyz[0] - center[0]) ** 2
            + (self.xyz[1] - center[1]) ** 2
            + ((self.xyz[2] - center[2]) / 1.3) ** 2
        )
        return np.clip(radius + 0.5 - d, 0.0, 1.0).astype(np.float32)

    def _bridge(self, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
        """Soft cylinder of ``radius`` between points a and b."""
        if radius <= 0:
            return np.zeros(self.shape, np.float32)
        ab = b - a
        rel = self.xyz - a[:, None, None, None]
        t = np.clip(np.einsum("i,i...->...", ab, rel) / float(ab @ ab), 0.0, 1.0)
        closest = a[:, None, None, None] + ab[:, None, None, None] * t
        d = np.sqrt(((self.xyz - closest) ** 2).sum(axis=0))
        return np.clip(radius + 0.5 - d, 0.0, 1.0).astype(np.float32)

    def state(self, day: float, index: int, n_sessions: int) -> LesionState:
        u = index / max(n_sessions - 1, 1)
        t2 = np.zeros(self.shape, np.float32)
        owner = np.zeros(self.shape, np.int16)
        for item in MS_DESIGN:
            ball = self._ball(self.centers[item["id"]], _radius_at(item["radii"], u))
            if "bridge" in item:
                radius = _radius_at(item["bridge"], u)
                partner = self.centers[item["partner"]]
                ball = np.maximum(ball, self._bridge(self.centers[item["id"]], partner, radius))
            owner[(ball >= 0.5) & (ball > t2)] = item["id"]
            t2 = np.maximum(t2, ball)
        t2 *= np.clip(self.wm * 2.0, 0.0, 1.0)  # plaques live in white matter
        radc = (1.0 + (MS_RADC_PLATEAU - 1.0) * t2).astype(np.float32)
        return LesionState(radc=radc, t2=t2, owner=owner)


LESION_MODELS = {"control": NoLesions, "seed-case": SeedCaseLesions, "ms-like": MSLikeLesions}
