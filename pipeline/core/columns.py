"""Column names, units and descriptions of every table the project writes.

The phantom's truth tables and the pipeline's tables share these names so they compare
directly; JSON sidecars are generated from these dictionaries.
"""

from __future__ import annotations

SESSION_COLUMNS: dict[str, dict[str, str]] = {
    "session": {"Description": "BIDS session label (without 'ses-')"},
    "day": {"Description": "Days since the subject's first session", "Units": "day"},
    "flair_volume_ml": {"Description": "Volume of FLAIR-hyperintense white-matter lesion", "Units": "mL"},
    "restricted_volume_ml": {
        "Description": "Volume of restricted diffusion (DWI hyperintense, rADC below the cut-off)",
        "Units": "mL",
    },
    "shine_through_volume_ml": {
        "Description": "Volume that is DWI hyperintense but has a normal ADC (T2 shine-through); not counted as restricted",
        "Units": "mL",
    },
    "ever_restricted_volume_ml": {
        "Description": "Volume restricted at this or any earlier session (union)",
        "Units": "mL",
    },
    "adc_nawm_um2_s": {"Description": "Median ADC of normal-appearing white matter (reference)", "Units": "um^2/s"},
    "adc_nawm_iqr_um2_s": {"Description": "Interquartile range of NAWM ADC", "Units": "um^2/s"},
    "adc_mean_restricted_um2_s": {"Description": "Mean ADC in the restricted-diffusion mask", "Units": "um^2/s"},
    "radc_mean_restricted": {"Description": "Mean rADC (ADC / NAWM ADC) in the restricted-diffusion mask", "Units": "ratio"},
    "radc_mean_flair": {"Description": "Mean rADC in the FLAIR lesion mask", "Units": "ratio"},
    "radc_mean_ever_restricted": {"Description": "Mean rADC over voxels restricted at this or any earlier session", "Units": "ratio"},
    "pseudonormalized_fraction": {
        "Description": "Fraction of ever-restricted voxels whose rADC is no longer below the restriction cut-off",
        "Units": "ratio",
    },
}
