"""The subject report as steps of the participant workflow.

The runner (the composition root) hands :func:`subject_report_node` and
:func:`report_views_node` to :func:`pipeline.workflows.base.init_subject_wf`, which runs them
as Nipype ``Function`` nodes (the report's slices and QC figure beside tracking, the report
beside the compression of the derivatives): the workflows and interfaces never import the
reports. This module imports nothing heavy, so that handing the function over costs the main
process no matplotlib import.
"""


def subject_report_node(**files):
    """Draw sub-X.html into ``report/`` of the node's folder (the working directory) from the
    work-dir files the derivatives are being written from; returns its path.

    ``files``: ``subject``, ``labels``, ``day_source``, ``config``, the subject files of
    the workflow and, when the workflow has the node, the folder of :func:`report_views_node`
    as ``views`` (see :func:`pipeline.reports.subject.write_work_report`). Nipype runs this
    function from its source in an empty namespace, hence the imports inside.
    """
    from pathlib import Path

    from pipeline.reports.subject import write_work_report

    return str(write_work_report(Path.cwd() / "report", **files))


def report_views_node(**files):
    """Extract the report's image slices and draw its registration QC figure into ``views/``
    of the node's folder, before tracking has ended; returns that folder (the report node's
    ``views`` input).

    ``files``: ``subject``, ``labels``, ``days`` and the work-dir images (see
    :func:`pipeline.reports.subject.write_work_views`).
    """
    from pathlib import Path

    from pipeline.reports.subject import write_work_views

    return str(write_work_views(Path.cwd() / "views", **files))
