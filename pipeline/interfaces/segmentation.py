"""Segment all sessions of a subject jointly in the subject space."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

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
from pipeline.interfaces.base import (
    array,
    like,
    read,
    save,
    save_json,
    session_flags,
    spacing_zyx,
)


class _SegmentSessionsInputSpec(BaseInterfaceInputSpec):
    flair = InputMultiObject(File(exists=True), mandatory=True,
                             desc="FLAIR per session (all-NaN placeholder where missing)")
    brain_mask = InputMultiObject(File(exists=True), mandatory=True)
    trace = InputMultiObject(File(exists=True), mandatory=True, desc="trace DWI per session")
    adc = InputMultiObject(File(exists=True), mandatory=True, desc="ADC (um^2/s) per session")
    b0 = InputMultiObject(File(exists=True),
                          desc="b0 per session: reference regions of sessions without FLAIR")
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

    Sessions may lack a contrast (``has_flair`` / ``has_dwi``):

    * FLAIR lesions come from the sessions with a FLAIR, segmented jointly; where diffusion is
      missing, CSF is found from the FLAIR alone. A session without FLAIR has an empty mask.
    * A session without FLAIR takes its reference regions (CSF, deep tissue, NAWM candidates)
      from its b0, which like FLAIR shows white matter as the darkest non-CSF tissue.
    * A session without diffusion has empty restricted / shine-through / NAWM masks, an
      all-NaN rADC and a NaN NAWM reference.
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
        if not all(has_flair) and len(b0_files) != n:
            raise ValueError("sessions without FLAIR need the b0 of every session (input b0)")
        ref_img = read(self.inputs.flair[0])
        spacing = spacing_zyx(ref_img)
        brains = [array(read(f)) > 0 for f in self.inputs.brain_mask]
        adcs = [array(read(f)) if ok else None for f, ok in zip(self.inputs.adc, has_dwi)]
        # the image that sets each session's reference regions: its FLAIR, else its b0
        anat = [array(read(self.inputs.flair[i] if has_flair[i] else b0_files[i]))
                for i in range(n)]
        # The per-session steps run in threads: scipy.ndimage and numpy release the GIL in
        # their loops, and each session's result depends only on that session's images.
        workers = max(1, min(n, self.inputs.n_workers))

        def session_maps(i):
            return seg.flair_session_maps(
                anat[i], brains[i], adcs[i], csf_adc_min_um2_s=s["reference_csf_adc_min_um2_s"],
                csf_flair_max_ratio=s["csf_flair_max_ratio"],
                reference_csf_margin_mm=s["reference_csf_margin_mm"],
                reference_depth_mm=s["reference_depth_mm"], cortex_rim_mm=s["cortex_rim_mm"],
                csf_rim_mm=s["csf_rim_mm"], spacing_mm=spacing)

        with ThreadPoolExecutor(workers) as ex:
            maps = list(ex.map(session_maps, range(n)))
        del anat
        with_flair = [i for i in range(n) if has_flair[i]]
        lesions = [np.zeros(brains[i].shape, bool) for i in range(n)]
        joint = seg.hysteresis_series(
            [maps[i] for i in with_flair], [brains[i] for i in with_flair],
            z_seed=s["flair_z_seed"], z_grow=s["flair_z_grow"],
            gm_z_seed=s["flair_gm_z_seed"], gm_z_grow=s["flair_gm_z_grow"],
            min_lesion_volume_mm3=s["min_lesion_volume_mm3"], spacing_mm=spacing,
            edge_fraction=s["flair_edge_fraction"], edge_percentile=s["flair_edge_percentile"],
            rim_z_grow=s["flair_rim_z_grow"], change_sd=s["flair_change_sd"],
            change_smooth_mm=s["flair_change_smooth_mm"],
            edge_level_all_sessions=s["flair_edge_level_all_sessions"])
        for i, mask in zip(with_flair, joint):
            lesions[i] = mask
        # NAWM candidates from the same maps: deep parenchyma at most nawm_flair_z_max above
        # its FLAIR mode (white matter is the darkest non-CSF tissue on FLAIR).
        cands = [m.deep & (m.z_wm <= s["nawm_flair_z_max"]) for m in maps]
        del maps
        traces = [array(read(f)) if ok else None for f, ok in zip(self.inputs.trace, has_dwi)]

        def restricted_session(i, exclude):
            if adcs[i] is None:
                return None
            nawm = rd.nawm_reference_mask(
                adcs[i], cands[i], exclude, erosion_mm=d["nawm_erosion_mm"],
                lesion_margin_mm=d["nawm_lesion_margin_mm"], trim_sd=s["nawm_adc_trim_sd"],
                spacing_mm=spacing)
            return nawm, rd.segment_restricted(
                traces[i], adcs[i], brains[i], nawm, restricted_below=d["restricted_below"],
                dwi_hyperintense_ratio=s["dwi_hyperintense_ratio"],
                min_lesion_volume_mm3=s["min_lesion_volume_mm3"],
                csf_adc_min_um2_s=s["csf_adc_min_um2_s"], spacing_mm=spacing,
                edge_mm=d["restricted_edge_mm"], edge_ring_mm=d["restricted_edge_ring_mm"])

        def restricted_pass(exclude):
            with ThreadPoolExecutor(workers) as ex:
                return list(ex.map(lambda i: restricted_session(i, exclude), range(n)))

        first = restricted_pass(lesions)
        results = restricted_pass(lesions + [r[1].restricted for r in first if r is not None])

        outs = {k: [] for k in ("flair_lesion", "restricted", "shine_through", "radc", "nawm", "references")}
        def put(key, i, arr, dtype):
            name = f"{key}_{i:02d}.nii.gz"
            outs[key].append(save(like(arr.astype(dtype), ref_img), runtime, name, dtype))

        for i, (lesion, result) in enumerate(zip(lesions, results)):
            put("flair_lesion", i, lesion, np.uint8)
            if result is None:  # no diffusion in this session
                empty = np.zeros(lesion.shape, np.uint8)
                for key in ("restricted", "shine_through", "nawm"):
                    put(key, i, empty, np.uint8)
                put("radc", i, np.full(lesion.shape, np.nan, np.float32), np.float32)
                reference = {"median_um2_s": float("nan"), "iqr_um2_s": float("nan"), "n_voxels": 0}
            else:
                nawm, res = result
                put("restricted", i, res.restricted, np.uint8)
                put("shine_through", i, res.shine_through, np.uint8)
                put("radc", i, res.radc, np.float32)  # NaN outside the brain
                put("nawm", i, nawm, np.uint8)
                reference = dataclasses.asdict(res.reference_adc)
            outs["references"].append(save_json(reference, runtime, f"reference_{i:02d}.json"))
        self._results.update(outs)
        return runtime
