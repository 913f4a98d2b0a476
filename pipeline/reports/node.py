"""The subject report as a step of the participant workflow.

The runner (the composition root) hands :func:`subject_report_node` to
:func:`pipeline.workflows.base.init_subject_wf`, which runs it as a Nipype ``Function`` node
beside the compression of the derivatives: the workflows and interfaces never import the
reports. This module imports nothing heavy, so that handing the function over costs the main
process no matplotlib import.
"""


def subject_report_node(**files):
    """Draw sub-X.html into ``report/`` of the node's folder (the working directory) from the
    work-dir files the derivatives are being written from; returns its path.

    ``files``: ``subject``, ``labels``, ``day_source``, ``config`` and the subject files of
    the workflow (see :func:`pipeline.reports.subject.write_work_report`). Nipype runs this
    function from its source in an empty namespace, hence the imports inside.
    """
    from pathlib import Path

    from pipeline.reports.subject import write_work_report

    return str(write_work_report(Path.cwd() / "report", **files))
