"""lesionlapse: serial brain MRI lesion tracking."""

__version__ = "0.1.0"

#: Libraries whose versions go into the QC report and the methods paragraph.
SOFTWARE = ("lesionlapse", "numpy", "scipy", "SimpleITK", "nibabel", "nipype", "scikit-image",
            "edt", "pandas", "matplotlib")


def software_versions() -> dict[str, str]:
    """Installed version of each library of :data:`SOFTWARE` ("not installed" if absent)."""
    from importlib import metadata

    versions = {}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
