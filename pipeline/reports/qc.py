"""What the QC report says, in sentences: warnings, registration numbers and the methods text."""

from __future__ import annotations

import pandas as pd

from pipeline import software_versions as installed_versions
from pipeline.reports.data import SubjectDerivatives

CONTRASTS = (("flair", "FLAIR"), ("dwi", "DWI"), ("adc", "ADC"))
QC_COLUMNS = ("registration", "final_metric", "similarity_after", "rotation_deg",
              "translation_mm")


def _records(value) -> list[dict]:
    """A QC entry as a list of dicts (it may be a list, one dict, or a dict of dicts)."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    if isinstance(value, dict):
        if all(isinstance(v, dict) for v in value.values()) and value:
            return [{"registration": k, **v} for k, v in value.items()]
        return [value]
    return []


def registration_table(subject: SubjectDerivatives) -> pd.DataFrame:
    """One row per registration (DWI -> FLAIR per session, FLAIR -> subject space per session)."""
    rows = []
    labels = [s.label for s in subject.sessions]
    for step, key in (("DWI -> FLAIR", "dwi_to_flair"), ("FLAIR -> subject", "subject_space")):
        for i, record in enumerate(_records(subject.qc.get(key))):
            session = labels[i] if i < len(labels) else ""
            rows.append({"step": step, "session": session,
                         **{c: record.get(c) for c in QC_COLUMNS}})
    return pd.DataFrame(rows)


def _registration_warnings(subject: SubjectDerivatives) -> list[str]:
    reg = subject.config.get("registration", {})
    max_rot, max_shift = reg.get("max_rotation_deg"), reg.get("max_translation_mm")
    messages = []
    for _, row in registration_table(subject).iterrows():
        where = f"ses-{row['session']} {row['step']}"
        rot, shift = row.get("rotation_deg"), row.get("translation_mm")
        if max_rot is not None and rot is not None and abs(rot) > max_rot:
            messages.append(f"{where}: rotation {rot:.1f} deg exceeds the QC limit {max_rot:g} deg")
        if max_shift is not None and shift is not None and abs(shift) > max_shift:
            messages.append(f"{where}: translation {shift:.1f} mm exceeds the QC limit "
                            f"{max_shift:g} mm")
        if row.get("final_metric") is None or pd.isna(row.get("final_metric")):
            messages.append(f"{where}: registration metric missing (did the registration run?)")
    return messages


def _reference_warnings(subject: SubjectDerivatives) -> list[str]:
    """Sessions whose NAWM ADC reference region is smaller than [dynamics] nawm_min_volume_ml
    (the segmentation already tried smaller erosions down to none)."""
    least = subject.config.get("dynamics", {}).get("nawm_min_volume_ml")
    table = subject.tables.get("sessions")
    if least is None or table is None or "nawm_volume_ml" not in table:
        return []
    return [f"ses-{row['session']}: the NAWM ADC reference holds only {row['nawm_volume_ml']:.2g} "
            f"mL (less than nawm_min_volume_ml = {least:g} mL even without erosion): the rADC and "
            "restricted-diffusion calls of this session rest on few voxels; check that its DWI "
            "and FLAIR (or b0) cover the deep white matter"
            for _, row in table.iterrows()
            if pd.notna(row["nawm_volume_ml"]) and row["nawm_volume_ml"] < least]


def input_notes(subject: SubjectDerivatives) -> pd.DataFrame:
    """Per session: how the ADC unit was decided and how many loading warnings there were."""
    inputs = subject.qc.get("inputs") or {}
    rows = []
    for session in subject.sessions:
        report = inputs.get(session.label) or {}
        rows.append({"session": session.label, "day": session.day,
                     "adc_unit_detection": report.get("adc_unit_detection", "n/a"),
                     "warnings": len(report.get("warnings") or [])})
    return pd.DataFrame(rows)


def collect_warnings(subject: SubjectDerivatives) -> list[str]:
    """Everything a reader should not miss: input warnings, QC failures, missing contrasts, a
    NAWM reference too small to trust.

    Parameters
    ----------
    subject : SubjectDerivatives
        The subject's derivatives.

    Returns
    -------
    list of str
        One sentence per problem, session first; empty when all is well.
    """
    messages = []
    if not subject.qc:
        messages.append("no QC report (sub-X_desc-qc_report.json): registration quality and "
                        "input warnings are unknown")
    inputs = subject.qc.get("inputs") or {}
    for session in subject.sessions:
        for warning in (inputs.get(session.label) or {}).get("warnings") or []:
            messages.append(f"ses-{session.label}: {warning}")
        for key, name in CONTRASTS:
            if session.paths.get(key) is None:
                messages.append(f"ses-{session.label}: no {name} image in the subject space "
                                "(missing contrast)")
    messages += _registration_warnings(subject)
    messages += _reference_warnings(subject)
    for key in ("sessions", "events", "lesions"):
        if not subject.table_path(key).exists():
            messages.append(f"table {subject.table_path(key).name} is missing")
    return messages


def software_versions(qc: dict) -> tuple[dict[str, str], bool]:
    """Library versions: those the QC report recorded, else those of this environment.

    Returns
    -------
    versions : dict
        Package -> version.
    recorded : bool
        True when they come from the QC report (the run), False when from the environment
        rendering the report.
    """
    recorded = qc.get("software") or qc.get("versions")
    if isinstance(recorded, dict) and recorded:
        return {str(k): str(v) for k, v in recorded.items()}, True
    return installed_versions(), False


def _get(config: dict, section: str, key: str, default="n/a"):
    value = (config.get(section) or {}).get(key, default)
    if isinstance(value, list):
        return ", ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else value


def _preprocessing_text(g, version: str, libs: str, origin: str) -> str:
    return (
        f"Images were processed with lesionlapse {version} ({libs}; versions {origin}). "
        f"Scanner ADC maps were converted to um^2/s (unit setting: {g('inputs', 'adc_unit')}; "
        f"plausible brain median {g('inputs', 'adc_plausible_min_um2_s')}-"
        f"{g('inputs', 'adc_plausible_max_um2_s')} um^2/s). Images were bias-corrected with N4 "
        f"(shrink factor {g('preprocessing', 'n4_shrink_factor')}, iterations "
        f"{g('preprocessing', 'n4_iterations')})."
    )


def _registration_text(g) -> str:
    return (
        f"Within each session the DWI was registered to the FLAIR "
        f"({g('registration', 'dwi_to_flair')}); all sessions were registered rigidly into an "
        f"unbiased within-subject space (template iterations: "
        f"{g('registration', 'template_iterations')}; "
        f"{g('registration', 'output_spacing_mm')} mm voxels) with the "
        f"{g('registration', 'metric')} metric ({g('registration', 'histogram_bins')} bins, "
        f"shrink factors {g('registration', 'shrink_factors')}, smoothing "
        f"{g('registration', 'smoothing_sigmas_mm')} mm), and every image was resampled once "
        f"with the composed transforms."
    )


def _segmentation_text(g) -> str:
    below, above = g("dynamics", "restricted_below"), g("dynamics", "elevated_above")
    return (
        f"FLAIR lesions were segmented by spatio-temporal hysteresis on a robust z-score (seed "
        f"{g('segmentation', 'flair_z_seed')}, grow {g('segmentation', 'flair_z_grow')}, "
        f"minimum {g('segmentation', 'min_lesion_volume_mm3')} mm^3). Restricted diffusion was "
        f"trace DWI above {g('segmentation', 'dwi_hyperintense_ratio')} times the normal-"
        f"appearing white matter median with rADC below {below}; rADC between {below} and "
        f"{above} counts as pseudonormal, above {above} as elevated."
    )


def _tracking_text(g) -> str:
    return (
        f"Lesions were tracked across sessions by overlap ({g('tracking', 'connectivity')}-"
        f"connectivity, at least {g('tracking', 'min_overlap_voxels')} voxels, shift tolerance "
        f"{g('tracking', 'shift_tolerance_voxels')} voxel); a lesion was enlarging or shrinking "
        f"when its volume changed by more than {g('tracking', 'enlarging_relative')} (relative) "
        f"and {g('tracking', 'enlarging_absolute_ml')} mL."
    )


def methods_paragraphs(subject: SubjectDerivatives) -> list[str]:
    """A methods section from the configuration and versions recorded in the QC report.

    Parameters
    ----------
    subject : SubjectDerivatives
        The subject's derivatives; its QC report holds the configuration of the run.

    Returns
    -------
    list of str
        Paragraphs (plain text); values the QC report lacks read 'n/a'.
    """
    config = subject.config

    def g(section: str, key: str):
        return _get(config, section, key)

    versions, recorded = software_versions(subject.qc)
    libs = ", ".join(f"{k} {v}" for k, v in versions.items())
    origin = ("as recorded by the run" if recorded else "of the environment that rendered this "
              "report; the QC report does not record them")
    version = subject.qc.get("version", "(unknown version)")
    return [_preprocessing_text(g, version, libs, origin), _registration_text(g),
            _segmentation_text(g), _tracking_text(g)]
