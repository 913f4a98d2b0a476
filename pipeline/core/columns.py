"""Column names, units and descriptions of every table the project writes.

The phantom's truth tables and the pipeline's tables share these names so they compare
directly; JSON sidecars are generated from these dictionaries.
"""

from __future__ import annotations

SESSION_COLUMNS: dict[str, dict[str, str]] = {
    "session": {
        "Description": (
            "BIDS session label (without 'ses-'). Columns that need a contrast the session lacks "
            "(FLAIR, or diffusion) are n/a: not observed, not 0"
        ),
    },
    "day": {"Description": "Days since the subject's first session", "Units": "day"},
    "flair_volume_ml": {"Description": "Volume of FLAIR-hyperintense white-matter lesion", "Units": "mL"},
    "restricted_volume_ml": {
        "Description": "Volume of restricted diffusion (DWI hyperintense, rADC below the cut-off)",
        "Units": "mL",
    },
    "shine_through_volume_ml": {
        "Description": "Volume of T2 shine-through: lesion tissue that is DWI hyperintense (trace above dwi_hyperintense_ratio x the NAWM median) with rADC not below the restriction cut-off; not counted as restricted. The pipeline looks for it inside the session's FLAIR lesions only (dynamics.shine_through_in_flair_lesion): normal grey matter, DWI-brighter than white matter, is not shine-through; n/a in a session without FLAIR",
        "Units": "mL",
    },
    "ever_restricted_volume_ml": {
        "Description": "Volume restricted at this or any earlier session (union)",
        "Units": "mL",
    },
    "adc_nawm_um2_s": {"Description": "Median ADC of normal-appearing white matter (reference)", "Units": "um^2/s"},
    "adc_nawm_iqr_um2_s": {"Description": "Interquartile range of NAWM ADC", "Units": "um^2/s"},
    "nawm_volume_ml": {
        "Description": (
            "Volume of the NAWM reference region the ADC reference is measured in; below "
            "[dynamics] nawm_min_volume_ml the report warns that this session's rADC rests on "
            "few voxels"),
        "Units": "mL",
    },
    "adc_mean_restricted_um2_s": {"Description": "Mean ADC in the restricted-diffusion mask", "Units": "um^2/s"},
    "adc_median_restricted_um2_s": {"Description": "Median ADC in the restricted-diffusion mask", "Units": "um^2/s"},
    "radc_mean_restricted": {"Description": "Mean rADC (ADC / NAWM ADC) in the restricted-diffusion mask", "Units": "ratio"},
    "radc_median_restricted": {"Description": "Median rADC in the restricted-diffusion mask", "Units": "ratio"},
    "radc_mean_restricted_core": {
        "Description": (
            "Mean rADC in the core of the restricted lesions: per lesion its voxels at least "
            "[dynamics] radc_core_depth_mm inside the restricted mask (a lesion thinner than "
            "that: its deepest voxels), like a region of interest placed in the lesion's centre. "
            "The rADC of the lesion itself: the outer millimetres mix, at the DWI's resolution, "
            "lesion with surrounding tissue and raise radc_mean_restricted"
        ),
        "Units": "ratio",
    },
    "radc_mean_flair": {"Description": "Mean rADC in the FLAIR lesion mask", "Units": "ratio"},
    "radc_median_flair": {"Description": "Median rADC in the FLAIR lesion mask", "Units": "ratio"},
    "radc_mean_ever_restricted": {"Description": "Mean rADC over voxels restricted at this or any earlier session", "Units": "ratio"},
    "pseudonormalized_fraction": {
        "Description": "Fraction of ever-restricted voxels that are outside the restricted mask now and whose rADC is no longer below the restriction cut-off",
        "Units": "ratio",
    },
    "pseudonormal_volume_ml": {
        "Description": (
            "Volume of ever-restricted voxels whose rADC is now pseudonormal (between "
            "[dynamics] restricted_below and elevated_above)"
        ),
        "Units": "mL",
    },
    "elevated_volume_ml": {
        "Description": "Volume of ever-restricted voxels whose rADC is now elevated (above [dynamics] elevated_above)",
        "Units": "mL",
    },
}

_SESSION_LABEL = "Session label (BIDS label without 'ses-'; the session index when no labels were given)"

LINEAGE_COLUMNS: dict[str, dict[str, object]] = {
    "lesion_id": {
        "Description": "Persistent lesion id (value in the dseg images); 1..N by first session, then decreasing volume",
    },
    "origin": {
        "Description": "How the lesion id began (a merge or split always starts new ids)",
        "Levels": {
            "baseline": "present at the first session",
            "new": "no overlapping predecessor",
            "merge": "one component formed from two or more earlier lesions (a merge always gets a new id)",
            "split": "one of two or more pieces of earlier lesion(s), or a fragment split off a lesion that keeps its id",
        },
    },
    "first_session": {"Description": f"First session with this id. {_SESSION_LABEL}"},
    "first_day": {"Description": "Day of the first session with this id", "Units": "day"},
    "last_session": {"Description": f"Last session with this id. {_SESSION_LABEL}"},
    "last_day": {"Description": "Day of the last session with this id", "Units": "day"},
    "n_sessions": {
        "Description": "Number of sessions with this id (consecutive observed sessions; unobserved ones are not counted)",
        "Units": "count",
    },
    "parents": {"Description": "Ids this lesion came from by merge or split (';'-joined, ascending; empty otherwise)"},
    "children": {"Description": "Ids this lesion went into by merge or split (';'-joined, ascending; empty otherwise)"},
    "fate": {
        "Description": "What ended the id: 'present' (still present at the last session), 'resolved', 'merged' or 'split'",
        "Levels": {
            "present": "present at the subject's last session",
            "resolved": "no overlapping successor",
            "merged": "merged with other lesions into a new id, or absorbed as a fragment by a lesion that keeps its id (see children)",
            "split": "split into several new ids (see children)",
        },
    },
}

EVENT_COLUMNS: dict[str, dict[str, object]] = {
    "lesion_id": {
        "Description": (
            "Persistent lesion id; one row per id per interval in which it exists at either end. "
            "Intervals join consecutive sessions where this kind was observed (a session without "
            "the contrast is bridged, ids continue across it)"
        ),
    },
    "from_session": {"Description": f"Session at the start of the interval. {_SESSION_LABEL}"},
    "to_session": {"Description": f"Session at the end of the interval. {_SESSION_LABEL}"},
    "from_day": {"Description": "Day of from_session", "Units": "day"},
    "to_day": {"Description": "Day of to_session", "Units": "day"},
    "event": {
        "Description": "What happened to this id over the interval",
        "Levels": {
            "new": "appears at to_session with no overlapping predecessor",
            "enlarging": "present at both; grew by more than both the relative and the absolute threshold",
            "stable": "present at both; change within either threshold",
            "shrinking": "present at both; shrank by more than both the relative and the absolute threshold",
            "resolved": "present at from_session, no overlapping successor",
            "merged": (
                "part of a merge: an id ending in a merge (successor_ids), the merged id born at "
                "to_session (predecessor_ids), or a fragment absorbed by a continuing id"
            ),
            "split": (
                "part of a split: an id ending in a split (successor_ids), a piece born at "
                "to_session (predecessor_ids), or a fragment split off a continuing id"
            ),
        },
    },
    "volume_from_ml": {"Description": "Volume of this id at from_session (0 if it does not exist yet)", "Units": "mL"},
    "volume_to_ml": {"Description": "Volume of this id at to_session (0 if it no longer exists)", "Units": "mL"},
    "change_ml": {"Description": "volume_to_ml - volume_from_ml", "Units": "mL"},
    "change_relative": {
        "Description": "change_ml / volume_from_ml (n/a when the id does not exist at from_session)",
        "Units": "ratio",
    },
    "predecessor_ids": {
        "Description": (
            "For an id born by merge/split: the ids it came from; for an id present at both "
            "ends: the fragments it absorbed (see [tracking] fragment_ratio) (';'-joined)"
        ),
    },
    "successor_ids": {
        "Description": (
            "For an id ending in a merge/split: the ids it went into; for an id present at both "
            "ends: the fragments split off it (';'-joined)"
        ),
    },
}

LESION_COLUMNS: dict[str, dict[str, object]] = {
    "lesion_id": {"Description": "Persistent lesion id (see the lineage table of the same kind)"},
    "kind": {
        "Description": "Tracked lesion masks",
        "Levels": {"flair": "FLAIR-hyperintense lesion", "restricted": "restricted-diffusion lesion"},
    },
    "session": {"Description": _SESSION_LABEL},
    "day": {"Description": "Days since the subject's first session", "Units": "day"},
    "observed": {
        "Description": (
            "Whether this kind's lesion mask was acquired at this session (FLAIR for flair, "
            "diffusion for restricted); when false the lesion columns are n/a, not 0"
        ),
    },
    "present": {
        "Description": (
            "Whether the id exists at this session (rows continue after it ends, to follow its "
            "tissue); false also when the session is not observed"
        ),
    },
    "volume_ml": {
        "Description": "Volume of the lesion at this session (0 when not present, n/a when not observed)",
        "Units": "mL",
    },
    "adc_mean_um2_s": {"Description": "Mean ADC in the lesion", "Units": "um^2/s"},
    "adc_median_um2_s": {"Description": "Median ADC in the lesion", "Units": "um^2/s"},
    "radc_mean": {"Description": "Mean rADC (ADC / NAWM ADC) in the lesion", "Units": "ratio"},
    "radc_median": {"Description": "Median rADC in the lesion", "Units": "ratio"},
    "radc_mean_core": {
        "Description": (
            "Mean rADC in the lesion's core: its voxels at least [dynamics] radc_core_depth_mm "
            "inside (a thinner lesion: its deepest voxels), like a region of interest placed in "
            "its centre, away from the rim that the DWI voxel mixes with surrounding tissue"
        ),
        "Units": "ratio",
    },
    "radc_mean_initial": {
        "Description": (
            "Mean rADC at this session over the voxels the lesion occupied when first seen: "
            "follows that tissue through pseudonormalization, also after the lesion ended"
        ),
        "Units": "ratio",
    },
    "restricted_volume_ml": {"Description": "Volume of restricted-diffusion voxels inside the lesion", "Units": "mL"},
    "shine_through_volume_ml": {"Description": "Volume of T2 shine-through voxels inside the lesion", "Units": "mL"},
    "ever_restricted_volume_ml": {
        "Description": "Volume of voxels that were restricted inside this lesion at this or any earlier session",
        "Units": "mL",
    },
    "pseudonormalized_fraction": {
        "Description": "Fraction of the lesion's ever-restricted voxels that are outside the restricted mask now and whose rADC is no longer below the restriction cut-off",
        "Units": "ratio",
    },
    "pseudonormal_volume_ml": {
        "Description": "Volume of the lesion's ever-restricted voxels whose rADC is now pseudonormal",
        "Units": "mL",
    },
    "elevated_volume_ml": {
        "Description": "Volume of the lesion's ever-restricted voxels whose rADC is now elevated",
        "Units": "mL",
    },
}

LESION_SUMMARY_COLUMNS: dict[str, dict[str, object]] = {
    "lesion_id": LESION_COLUMNS["lesion_id"],
    "kind": LESION_COLUMNS["kind"],
    "first_day": {"Description": "Day the lesion is first present", "Units": "day"},
    "last_day": {"Description": "Day the lesion is last present", "Units": "day"},
    "max_volume_ml": {"Description": "Largest volume over the sessions it is present", "Units": "mL"},
    "nadir_radc": {"Description": "Lowest radc_mean_initial (rADC of the initially occupied tissue)", "Units": "ratio"},
    "nadir_day": {"Description": "Day of nadir_radc", "Units": "day"},
    "first_restriction_day": {"Description": "First day with restricted voxels inside the lesion (n/a if never)", "Units": "day"},
    "pseudonormalization_day": {
        "Description": (
            "Day radc_mean_initial climbs back to the restriction cut-off, linearly interpolated "
            "between sessions; when censored, the last day with an rADC measurement; n/a when never below the cut-off"
        ),
        "Units": "day",
    },
    "censored": {"Description": "True when the cut-off was not reached by the last session (pseudonormalization_day is a lower bound)"},
    "days_from_first_restriction_to_pseudonormalization": {
        "Description": "pseudonormalization_day - first_restriction_day (a lower bound when censored)",
        "Units": "day",
    },
}
