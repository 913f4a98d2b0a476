"""Segment all sessions of a subject jointly in the subject space."""

from __future__ import annotations

import dataclasses
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from pipeline.core import restricted as rd
from pipeline.core import segmentation as seg
from pipeline.core.boxes import bounding_box, paste
from pipeline.core.segmentation import analysis_box
from pipeline.interfaces.base import read, save_array, save_json, session_flags, spacing_zyx
from pipeline.io import read_array


class _SegmentSessionsInputSpec(BaseInterfaceInputSpec):
    flair = InputMultiObject(File(exists=True), mandatory=True,
                             desc="FLAIR per session (all-NaN placeholder where missing)")
    brain_mask = InputMultiObject(File(exists=True), mandatory=True)
    trace = InputMultiObject(File(exists=True), mandatory=True, desc="trace DWI per session")
    adc = InputMultiObject(File(exists=True), mandatory=True, desc="ADC (um^2/s) per session")
    b0 = InputMultiObject(File(exists=True),
                          desc="b0 per session: reference regions of sessions without FLAIR")
    flair_fov_edge = InputMultiObject(
        File(exists=True), desc="per session: through-plane distance (mm) to the native FLAIR's "
        "slab edge (ResampleSession's flair_fov_edge): no FLAIR lesion seeds within "
        "flair_fov_edge_no_seed_mm of it; not given: seeds anywhere")
    dwi_inplane_mm = InputMultiObject(
        traits.Float, mandatory=True,
        desc="per session: the native DWI's in-plane voxel (mm; ResampleSession's "
        "dwi_inplane_mm): the restricted edge step reaches [dynamics] "
        "restricted_edge_dwi_voxels of it (read only where has_dwi)")
    has_flair = traits.List(traits.Bool, desc="per session: FLAIR present (default: all)")
    has_dwi = traits.List(traits.Bool, desc="per session: diffusion present (default: all)")
    labels = traits.List(traits.Str, mandatory=True)
    segmentation = traits.Dict(mandatory=True, desc="the [segmentation] section")
    dynamics = traits.Dict(mandatory=True, desc="the [dynamics] section")
    n_workers = traits.Int(1, usedefault=True,
                           desc="threads over sessions for the per-session steps")


class _SegmentSessionsOutputSpec(TraitedSpec):
    flair_lesion = OutputMultiObject(File())
    restricted = OutputMultiObject(File())
    shine_through = OutputMultiObject(File())
    radc = OutputMultiObject(File())
    nawm = OutputMultiObject(File())
    references = OutputMultiObject(File(), desc="JSON: NAWM reference ADC per session")


class SegmentSessions(SimpleInterface):
    """FLAIR lesions (jointly over time), then NAWM, rADC and restricted diffusion per session.

    The NAWM ADC reference is deep parenchyma darker than its FLAIR mode with ADC near its mode
    (:func:`pipeline.core.segmentation.nawm_candidates`,
    :func:`pipeline.core.restricted.nawm_reference_mask`), away from
    every lesion of every session: a first pass excludes the FLAIR lesions, a second pass also
    the restricted tissue found by the first.

    The restricted edge step of each session reaches ``[dynamics] restricted_edge_dwi_voxels``
    of that session's native DWI in-plane voxel (``dwi_inplane_mm``,
    :func:`pipeline.core.restricted.edge_reach_mm`).

    With ``flair_fov_edge`` (per session, ResampleSession's distance to the native FLAIR's slab
    edge) no FLAIR lesion seeds within ``flair_fov_edge_no_seed_mm`` of that edge
    (:func:`pipeline.core.segmentation.fov_seed_zone`); growth may still enter it.

    Sessions may lack a contrast (``has_flair`` / ``has_dwi``):

    * FLAIR lesions come from the sessions with a FLAIR, segmented jointly; where diffusion is
      missing, CSF is found from the FLAIR alone. A session without FLAIR has an empty mask.
    * A session without FLAIR takes its reference regions (CSF, deep tissue, NAWM candidates)
      from its b0, which like FLAIR shows white matter as the darkest non-CSF tissue.
    * A session without diffusion has empty restricted / shine-through / NAWM masks, an
      all-NaN rADC and a NaN NAWM reference.
    * T2 shine-through is looked for inside the session's FLAIR lesions only
      (``[dynamics] shine_through_in_flair_lesion``): a session without FLAIR then has an
      empty shine-through mask (its table column is NaN, not observed).
    """

    input_spec = _SegmentSessionsInputSpec
    output_spec = _SegmentSessionsOutputSpec

    def _run_interface(self, runtime):
        s, d = self.inputs.segmentation, self.inputs.dynamics
        n = len(self.inputs.labels)
        has_flair = session_flags(self.inputs.has_flair, n, "has_flair")
        has_dwi = session_flags(self.inputs.has_dwi, n, "has_dwi")
        b0_files = list(self.inputs.b0) if isdefined(self.inputs.b0) else []
        for name, value in (("flair", self.inputs.flair), ("brain_mask", self.inputs.brain_mask),
                            ("trace", self.inputs.trace), ("adc", self.inputs.adc)):
            if len(value) != n:
                raise ValueError(f"{name}: {len(value)} entries for {n} sessions")
        dwi_inplane = list(self.inputs.dwi_inplane_mm)
        if len(dwi_inplane) != n:
            raise ValueError(f"dwi_inplane_mm: {len(dwi_inplane)} entries for {n} sessions")
        fov_files = (list(self.inputs.flair_fov_edge) if isdefined(self.inputs.flair_fov_edge)
                     else None)
        if fov_files is not None and len(fov_files) != n:
            raise ValueError(f"flair_fov_edge: {len(fov_files)} entries for {n} sessions")
        if not all(has_flair) and len(b0_files) != n:
            raise ValueError("sessions without FLAIR need the b0 of every session (input b0)")
        ref_img = read(self.inputs.flair[0])
        spacing = spacing_zyx(ref_img)
        # Memory: every image is read from its file when a step needs it and dropped after, so
        # the node holds per session only bool masks and the two float z-maps the joint step
        # needs (not the FLAIR, ADC, trace or the per-session results of the restricted passes).
        brains = [read_array(f) > 0 for f in self.inputs.brain_mask]
        # Every step works on the box around the sessions' brains (see analysis_box): the
        # subject-space grid is ~4x the brain's volume, and the masks are the same.
        full_shape = brains[0].shape
        box = tuple(slice(*sl.indices(k)[:2])  # explicit starts and stops
                    for sl, k in zip(analysis_box(brains, spacing, s["flair_change_smooth_mm"]),
                                     full_shape))
        brains = [b[box] for b in brains]

        def image(path):
            return read_array(path)[box]

        def adc(i):
            return image(self.inputs.adc[i]) if has_dwi[i] else None

        # The restricted passes read brain voxels only (NAWM, rADC, the masks and the rings
        # around restricted lesions all lie in the brain): they work on the bounding box of the
        # brains grown by one voxel inside the analysis box (~0.7x of it; erosions, distances
        # and labels are the same there), not on the joint step's smoothing margin.
        inner = bounding_box(np.logical_or.reduce(brains), 1)
        if inner is None:  # no brain voxel: the per-session maps say so (clear error)
            inner = tuple(slice(0, k) for k in brains[0].shape)
        inner_shape = tuple(sl.stop - sl.start for sl in inner)
        # where `inner` lies on the whole grid
        inner_on_grid = tuple(slice(b.start + sl.start, b.start + sl.stop)
                              for b, sl in zip(box, inner))

        # The per-session steps run in threads: scipy.ndimage and numpy release the GIL in
        # their loops, and each session's result depends only on that session's images.
        workers = max(1, min(n, self.inputs.n_workers))

        def session_maps(i):
            # the image that sets the session's reference regions: its FLAIR, else its b0
            anat = image(self.inputs.flair[i] if has_flair[i] else b0_files[i])
            m = seg.flair_session_maps(
                anat, brains[i], adc(i), csf_adc_min_um2_s=s["reference_csf_adc_min_um2_s"],
                csf_flair_max_ratio=s["csf_flair_max_ratio"],
                reference_csf_margin_mm=s["reference_csf_margin_mm"],
                reference_depth_mm=s["reference_depth_mm"], cortex_rim_mm=s["cortex_rim_mm"],
                csf_rim_mm=s["csf_rim_mm"], spacing_mm=spacing,
                # edt holds the GIL: the sessions' transforms run one at a time, each on the
                # node's threads
                threads=workers)
            # NAWM candidates from the same maps
            cand = m.nawm_candidates(s["nawm_flair_z_max"])
            # the joint step reads z, z_gm, domain and rim only; both restricted passes share
            # the candidates' erosion (on their box, see `inner` below)
            return seg.joint_step_maps(m), rd.candidate_erosions(
                cand[inner], d["nawm_erosion_mm"], spacing)

        maps, cands = map(list, zip(*seg.per_session(session_maps, n, workers)))
        with_flair = [i for i in range(n) if has_flair[i]]
        lesions = [np.zeros(brains[i].shape, bool) for i in range(n)]
        # where seeds may start: away from each FLAIR's native slab edge (bool, on the box; the
        # distance was taken on the whole grid, so the box's own edge plays no part)
        zones = None if fov_files is None else [
            seg.fov_seed_zone(image(fov_files[i]), s["flair_fov_edge_no_seed_mm"])
            for i in with_flair]
        joint = seg.hysteresis_series(
            [maps[i] for i in with_flair], [brains[i] for i in with_flair],
            z_seed=s["flair_z_seed"], z_grow=s["flair_z_grow"],
            gm_z_seed=s["flair_gm_z_seed"], gm_z_grow=s["flair_gm_z_grow"],
            min_lesion_volume_mm3=s["min_lesion_volume_mm3"], spacing_mm=spacing,
            edge_fraction=s["flair_edge_fraction"], edge_percentile=s["flair_edge_percentile"],
            rim_z_grow=s["flair_rim_z_grow"], change_sd=s["flair_change_sd"],
            change_smooth_mm=s["flair_change_smooth_mm"],
            edge_level_all_sessions=s["flair_edge_level_all_sessions"],
            edge_level_floor=s["flair_edge_level_floor"], seed_zones=zones, workers=workers)
        del maps, zones
        for i, mask in zip(with_flair, joint):
            lesions[i] = mask
        del joint

        def lesion_free(exclude):
            """Voxels of `inner` away from every mask of ``exclude``: the same for every session
            of a pass."""
            return rd.lesion_free(exclude, inner_shape, d["nawm_lesion_margin_mm"], spacing)

        min_nawm = rd.voxels_of(d["nawm_min_volume_ml"], spacing)

        def restricted_session(i, away):
            """NAWM mask and :class:`RestrictedResult` of session ``i`` (None without DWI);
            ``away``: :func:`lesion_free` of the lesions the NAWM keeps away from
            (:func:`pipeline.core.restricted.nawm_reference_mask` in parts)."""
            if not has_dwi[i]:
                return None
            adc_i = image(self.inputs.adc[i])[inner]
            nawm = rd.nawm_reference_from(adc_i, cands[i], away, trim_sd=s["nawm_adc_trim_sd"],
                                          min_voxels=min_nawm)
            return nawm, rd.segment_restricted(
                image(self.inputs.trace[i])[inner], adc_i, brains[i][inner], nawm,
                spacing_mm=spacing, shine_within=shine_region(i),
                **rd.restricted_settings(s, d, dwi_inplane=dwi_inplane[i]))

        def shine_region(i):
            """Where session ``i`` may have T2 shine-through: its FLAIR lesions
            (``[dynamics] shine_through_in_flair_lesion``; none without a FLAIR), else None."""
            if not d["shine_through_in_flair_lesion"]:
                return None
            return lesions[i][inner] if has_flair[i] else np.zeros(inner_shape, bool)

        # first pass: away from the FLAIR lesions (which lie in the brain, so in `inner`)
        away_flair = lesion_free([m[inner] for m in lesions])

        def first_pass(i):  # only the restricted masks are kept
            result = restricted_session(i, away_flair)
            return None if result is None else result[1].restricted

        first = seg.per_session(first_pass, n, workers)
        # second pass: also away from the restricted tissue the first pass found
        away_all = lesion_free([m[inner] for m in lesions] + [r for r in first if r is not None])
        del first, away_flair

        def save_session(i):
            """Second pass of session ``i``, written at once: output file per key."""
            files = {}

            def put(key, arr, dtype, where=inner_on_grid):
                # outside the box: no mask voxel, and rADC NaN (it is NaN outside the brain)
                full = paste(arr, where, full_shape, fill=np.nan if key == "radc" else 0,
                             dtype=dtype)
                files[key] = save_array(full, ref_img, runtime, f"{key}_{i:02d}.nii", dtype)

            lesion = lesions[i]
            result = restricted_session(i, away_all)
            put("flair_lesion", lesion, np.uint8, box)
            if result is None:  # no diffusion in this session
                empty = np.zeros(inner_shape, np.uint8)
                for key in ("restricted", "shine_through", "nawm"):
                    put(key, empty, np.uint8)
                put("radc", np.full(inner_shape, np.nan, np.float32), np.float32)
                reference = {"median_um2_s": float("nan"), "iqr_um2_s": float("nan"),
                             "n_voxels": 0}
            else:
                nawm, res = result
                put("restricted", res.restricted, np.uint8)
                put("shine_through", res.shine_through, np.uint8)
                put("radc", res.radc, np.float32)  # NaN outside the brain
                put("nawm", nawm, np.uint8)
                reference = dataclasses.asdict(res.reference_adc)
            files["references"] = save_json(reference, runtime, f"reference_{i:02d}.json")
            return files

        written = seg.per_session(save_session, n, workers)
        outs = {k: [f[k] for f in written]
                for k in ("flair_lesion", "restricted", "shine_through", "radc", "nawm",
                          "references")}
        self._results.update(outs)
        return runtime
