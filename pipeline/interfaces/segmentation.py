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
    traits,
)

from pipeline.core import segmentation as seg
from pipeline.interfaces.base import array, like, read, save, save_json, spacing_zyx


class _SegmentSessionsInputSpec(BaseInterfaceInputSpec):
    flair = InputMultiObject(File(exists=True), mandatory=True, desc="FLAIR per session")
    brain_mask = InputMultiObject(File(exists=True), mandatory=True)
    trace = InputMultiObject(File(exists=True), mandatory=True, desc="trace DWI per session")
    adc = InputMultiObject(File(exists=True), mandatory=True, desc="ADC (um^2/s) per session")
    labels = traits.List(traits.Str, mandatory=True)
    segmentation = traits.Dict(mandatory=True, desc="the [segmentation] section")
    dynamics = traits.Dict(mandatory=True, desc="the [dynamics] section")


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
    (:func:`pipeline.core.segmentation.nawm_candidates`, ``nawm_reference_mask``), away from
    every lesion of every session: a first pass excludes the FLAIR lesions, a second pass also
    the restricted tissue found by the first.
    """

    input_spec = _SegmentSessionsInputSpec
    output_spec = _SegmentSessionsOutputSpec

    def _run_interface(self, runtime):
        s, d = self.inputs.segmentation, self.inputs.dynamics
        ref_img = read(self.inputs.flair[0])
        spacing = spacing_zyx(ref_img)
        flairs = [array(read(f)) for f in self.inputs.flair]
        brains = [array(read(f)) > 0 for f in self.inputs.brain_mask]
        traces = [array(read(f)) for f in self.inputs.trace]
        adcs = [array(read(f)) for f in self.inputs.adc]
        maps = [
            seg.flair_session_maps(
                f, b, a, csf_adc_min_um2_s=s["reference_csf_adc_min_um2_s"],
                csf_flair_max_ratio=s["csf_flair_max_ratio"],
                reference_csf_margin_mm=s["reference_csf_margin_mm"],
                reference_depth_mm=s["reference_depth_mm"], cortex_rim_mm=s["cortex_rim_mm"],
                csf_rim_mm=s["csf_rim_mm"], spacing_mm=spacing)
            for f, b, a in zip(flairs, brains, adcs)
        ]
        lesions = seg.hysteresis_series(
            maps, brains, z_seed=s["flair_z_seed"], z_grow=s["flair_z_grow"],
            gm_z_seed=s["flair_gm_z_seed"], gm_z_grow=s["flair_gm_z_grow"],
            min_lesion_volume_mm3=s["min_lesion_volume_mm3"], spacing_mm=spacing)
        # NAWM candidates from the same maps: deep parenchyma at most nawm_flair_z_max above
        # its FLAIR mode (white matter is the darkest non-CSF tissue on FLAIR).
        cands = [m.deep & (m.z_wm <= s["nawm_flair_z_max"]) for m in maps]
        del maps

        def restricted_pass(exclude):
            out = []
            for cand, trace, adc, brain in zip(cands, traces, adcs, brains):
                nawm = seg.nawm_reference_mask(
                    adc, cand, exclude, lesion_margin_mm=d["nawm_lesion_margin_mm"],
                    trim_sd=s["nawm_adc_trim_sd"], spacing_mm=spacing)
                out.append((nawm, seg.segment_restricted(
                    trace, adc, brain, nawm, restricted_below=d["restricted_below"],
                    dwi_hyperintense_ratio=s["dwi_hyperintense_ratio"],
                    min_lesion_volume_mm3=s["min_lesion_volume_mm3"],
                    csf_adc_min_um2_s=s["csf_adc_min_um2_s"], spacing_mm=spacing,
                )))
            return out

        first = restricted_pass(lesions)
        results = restricted_pass(lesions + [r.restricted for _, r in first])

        outs = {k: [] for k in ("flair_lesion", "restricted", "shine_through", "radc", "nawm", "references")}
        for i, (lesion, (nawm, res)) in enumerate(zip(lesions, results)):
            def put(key, arr, dtype):
                outs[key].append(save(like(arr.astype(dtype), ref_img), runtime, f"{key}_{i:02d}.nii.gz", dtype))
            put("flair_lesion", lesion, np.uint8)
            put("restricted", res.restricted, np.uint8)
            put("shine_through", res.shine_through, np.uint8)
            put("radc", res.radc, np.float32)  # NaN outside the brain
            put("nawm", nawm, np.uint8)
            outs["references"].append(
                save_json(dataclasses.asdict(res.reference_adc), runtime, f"reference_{i:02d}.json")
            )
        self._results.update(outs)
        return runtime
