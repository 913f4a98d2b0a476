"""Lesion identities over sessions, events and the ADC time courses of one subject."""

from __future__ import annotations

import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from pipeline.core import dynamics, tracking
from pipeline.core.boxes import paste
from pipeline.core.dynamics import ReferenceADC
from pipeline.interfaces.base import (
    load_json, out_path, read, save_array, session_flags, spacing_zyx,
)
from pipeline.io import read_array


class _TrackLesionsInputSpec(BaseInterfaceInputSpec):
    flair_lesion = InputMultiObject(File(exists=True), mandatory=True)
    restricted = InputMultiObject(File(exists=True), mandatory=True)
    shine_through = InputMultiObject(File(exists=True), mandatory=True)
    adc = InputMultiObject(File(exists=True), mandatory=True, desc="ADC (um^2/s), subject space")
    radc = InputMultiObject(File(exists=True), mandatory=True)
    references = InputMultiObject(File(exists=True), mandatory=True, desc="NAWM reference JSONs")
    labels = traits.List(traits.Str, mandatory=True)
    has_flair = traits.List(traits.Bool, desc="per session: FLAIR acquired (default all)")
    has_dwi = traits.List(traits.Bool, desc="per session: diffusion acquired (default all)")
    days = traits.List(traits.Float, mandatory=True)
    tracking = traits.Dict(mandatory=True, desc="the [tracking] section of the configuration")
    dynamics = traits.Dict(mandatory=True, desc="the [dynamics] section of the configuration")


class _TrackLesionsOutputSpec(TraitedSpec):
    flair_dseg = OutputMultiObject(File(), desc="per session: persistent FLAIR lesion ids")
    restricted_dseg = OutputMultiObject(File(), desc="per session: persistent restricted lesion ids")
    diffusion_dseg = OutputMultiObject(
        File(), desc="per session: diffusion voxel classes of the lesion tissue "
        "(dynamics.VOXEL_CLASS_LABELS)")
    sessions_table = File(desc="one row per session")
    lesions_table = File(desc="one row per lesion per session")
    events_table = File(desc="one row per lesion per interval")
    lineage_table = File(desc="one row per lesion id")
    summary_table = File(desc="one row per lesion: nadir and pseudonormalization day")


class TrackLesions(SimpleInterface):
    """Track FLAIR and restricted lesions separately and measure ADC dynamics per session/lesion.

    A session without FLAIR (``has_flair``) or without diffusion (``has_dwi``) is not observed
    for that contrast: tracking bridges it and its table entries are n/a (not 0).
    """

    input_spec = _TrackLesionsInputSpec
    output_spec = _TrackLesionsOutputSpec

    def _run_interface(self, runtime):
        ins, trk, dyn = self.inputs, self.inputs.tracking, self.inputs.dynamics
        ref_img = read(ins.flair_lesion[0])
        voxel_ml = float(np.prod(ref_img.GetSpacing())) / 1000.0
        spacing = spacing_zyx(ref_img)
        # Everything below reads lesion voxels only: it works on the box around every mask of
        # every session (see tracking.lesion_box), not on the subject grid (~4x the brain),
        # and the images it writes are padded back onto the grid.
        full_shape = tuple(reversed(ref_img.GetSize()))

        def on_grid(path):
            arr = read_array(path)
            if arr.shape != full_shape:
                raise ValueError(f"{path}: grid {arr.shape} is not the subject grid {full_shape} "
                                 f"of {ins.flair_lesion[0]}; every input must be on it")
            return arr

        masks = {key: [on_grid(f).astype(bool) for f in files] for key, files in
                 (("flair", ins.flair_lesion), ("restricted", ins.restricted),
                  ("shine", ins.shine_through))}
        box = tracking.lesion_box([m for ms in masks.values() for m in ms],
                                  trk["shift_tolerance_voxels"])
        # copies, so that the whole-grid arrays are freed
        flair, restricted, shine = ([m[box].copy() for m in masks[key]]
                                    for key in ("flair", "restricted", "shine"))
        del masks
        load = lambda files: [on_grid(f)[box].astype(np.float32) for f in files]
        adc, radc = load(ins.adc), load(ins.radc)

        def save_padded(arr, dtype, name):
            """Write a box array back onto the subject grid (a work-dir .nii)."""
            return save_array(paste(arr, box, full_shape, dtype=dtype), ref_img, runtime, name,
                              dtype)

        refs = [ReferenceADC(**load_json(f)) for f in ins.references]
        n = len(ins.labels)
        has_flair = session_flags(ins.has_flair, n, "has_flair")
        has_dwi = session_flags(ins.has_dwi, n, "has_dwi")

        rows, ever, class_files = [], np.zeros_like(restricted[0]), []
        for i, label in enumerate(ins.labels):
            if has_dwi[i]:
                ever = ever | restricted[i]
            # lesion tissue: FLAIR lesion and every voxel restricted so far (all-NaN rADC
            # without diffusion: an empty image)
            classes = dynamics.voxel_class_image(
                radc[i], (flair[i] & has_flair[i]) | ever, shine[i] & has_dwi[i],
                restricted_below=dyn["restricted_below"], elevated_above=dyn["elevated_above"],
                restricted=restricted[i] & has_dwi[i])
            class_files.append(save_padded(classes, np.uint8, f"diffusion_dseg_{i:02d}.nii"))
            row = {"session": label, "day": ins.days[i]}
            row.update(dynamics.session_summary(
                flair_lesion=flair[i], restricted=restricted[i], shine_through=shine[i],
                ever_restricted=ever, adc_um2_s=adc[i], radc=radc[i], reference=refs[i],
                voxel_volume_ml=voxel_ml, restricted_below=dyn["restricted_below"],
                elevated_above=dyn["elevated_above"], flair_observed=has_flair[i], diffusion_observed=has_dwi[i],
                core_depth_mm=dyn["radc_core_depth_mm"], spacing_mm=spacing,
                shine_through_needs_flair=dyn["shine_through_in_flair_lesion"],
            ))
            rows.append(row)
        sessions = pd.DataFrame(rows)
        self._results["diffusion_dseg"] = class_files

        lesion_tables, event_tables, lineage_tables = [], [], []
        for kind, masks, observed in (("flair", flair, has_flair),
                                      ("restricted", restricted, has_dwi)):
            result = tracking.track_lesions(
                masks, ins.days, sessions=list(ins.labels), voxel_volume_ml=voxel_ml,
                connectivity=trk["connectivity"], min_overlap_voxels=trk["min_overlap_voxels"],
                shift_tolerance_voxels=trk["shift_tolerance_voxels"],
                enlarging_relative=trk["enlarging_relative"],
                enlarging_absolute_ml=trk["enlarging_absolute_ml"],
                fragment_ratio=trk["fragment_ratio"], observed=observed,
                index_offset=[sl.start for sl in box],
            )
            self._results[f"{kind}_dseg"] = [
                save_padded(d, np.int32, f"{kind}_dseg_{i:02d}.nii")
                for i, d in enumerate(result.dseg)
            ]
            lesion_tables.append(dynamics.lesion_table(
                result.dseg, kind=kind, adc_um2_s=adc, radc=radc, restricted=restricted,
                shine_through=shine, days=ins.days, sessions=list(ins.labels),
                voxel_volume_ml=voxel_ml, restricted_below=dyn["restricted_below"],
                elevated_above=dyn["elevated_above"], observed=observed,
                diffusion_observed=has_dwi, core_depth_mm=dyn["radc_core_depth_mm"],
                spacing_mm=spacing,
            ))
            event_tables.append(result.events.assign(kind=kind))
            lineage_tables.append(result.lineage.assign(kind=kind))
        lesions = pd.concat(lesion_tables, ignore_index=True)
        summary = dynamics.lesion_summary(lesions, cutoff=dyn["restricted_below"])

        for name, table in (("sessions_table", sessions), ("lesions_table", lesions),
                            ("events_table", _kind_first(pd.concat(event_tables, ignore_index=True))),
                            ("lineage_table", _kind_first(pd.concat(lineage_tables, ignore_index=True))),
                            ("summary_table", summary)):
            path = out_path(runtime, f"{name}.tsv")
            table.to_csv(path, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
            self._results[name] = path
        return runtime


def _kind_first(table: pd.DataFrame) -> pd.DataFrame:
    """Put the ``kind`` column right after ``lesion_id``."""
    cols = [c for c in table.columns if c != "kind"]
    pos = cols.index("lesion_id") + 1 if "lesion_id" in cols else 0
    return table[cols[:pos] + ["kind"] + cols[pos:]]
