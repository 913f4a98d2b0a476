"""BIDS discovery: sessions, days, files, labels and derivative names."""

from __future__ import annotations

import pytest

from pipeline.bids import BIDSError, clean_label, derivative_name, discover

from conftest import make_skeleton


def test_days_from_sessions_tsv_and_order(tmp_path):
    make_skeleton(tmp_path, sessions=("b", "a"),
                  acq_times=("2024-01-04T10:00:00", "2024-01-01T10:00:00"))
    (subject,) = discover(tmp_path)
    assert [s.session for s in subject.sessions] == ["a", "b"]  # by date, not by label
    assert [s.day for s in subject.sessions] == [0.0, 3.0]
    assert subject.day_source == "sessions.tsv"
    ses = subject.sessions[0]
    assert ses.flair.name.endswith("_FLAIR.nii.gz") and ses.bval and ses.bvec and ses.adc
    assert ses.trace is None


def test_days_from_labels(tmp_path):
    make_skeleton(tmp_path, sessions=("day08", "day3", "day45", "day0"))
    (subject,) = discover(tmp_path)
    assert [s.day for s in subject.sessions] == [0.0, 3.0, 8.0, 45.0]
    assert subject.day_source == "session labels"


def test_days_unknown_is_a_clear_error(tmp_path):
    make_skeleton(tmp_path, sessions=("pre", "post"))
    with pytest.raises(BIDSError, match="acq_time"):
        discover(tmp_path)


def test_participant_and_session_filters(tmp_path):
    make_skeleton(tmp_path, sessions=("day0", "day3", "day8"))
    make_skeleton(tmp_path, sessions=("day0",), subject="02")
    subjects = discover(tmp_path, ["sub-02", "01"], ["ses-day0", "day8"])
    assert [s.subject for s in subjects] == ["02", "01"]
    assert [s.session for s in subjects[1].sessions] == ["day0", "day8"]
    with pytest.raises(BIDSError, match="not found"):
        discover(tmp_path, ["03"])


@pytest.mark.parametrize("label", ["../x", "sub-01/..", "01 02", "", "sub-"])
def test_unsafe_labels_refused(label):
    with pytest.raises(BIDSError, match="invalid sub label"):
        clean_label(label, "sub")


def test_not_a_dataset(tmp_path):
    with pytest.raises(BIDSError, match="dataset_description.json"):
        discover(tmp_path)


def test_duplicate_images_refused(tmp_path):
    make_skeleton(tmp_path, sessions=("day0",))
    (tmp_path / "sub-01/ses-day0/anat/sub-01_ses-day0_run-2_FLAIR.nii.gz").write_bytes(b"")
    with pytest.raises(BIDSError, match="more than one"):
        discover(tmp_path)


def test_derivative_names_follow_entity_order():
    name = derivative_name("01", "day0", "mask", space="subject", label="lesion", desc="flair")
    assert name == "sub-01_ses-day0_space-subject_label-lesion_desc-flair_mask.nii.gz"
    xfm = derivative_name("01", "a", "xfm", extra={"from": "FLAIR", "to": "subject", "mode": "image"},
                          ext=".txt")
    assert xfm == "sub-01_ses-a_from-FLAIR_to-subject_mode-image_xfm.txt"
