"""Figures and self-contained HTML reports built from the derivatives.

data          reading a subject's tables, QC report and subject-space images
mosaic        the Figure-1-style mosaic and the registration QC overlays
trajectories  volumes, rADC, lesion histories and cohort plots (shared with the notebooks)
qc            warnings, registration numbers and the methods text from the QC report
subject       write_subject_report: OUTPUT_DIR/sub-X.html (write_work_report: from the work dir)
node          subject_report_node: the report step the runner hands the participant workflow
group         write_group_report: OUTPUT_DIR/group.html
sample        derivatives of sample_data for the notebooks and tests
"""
