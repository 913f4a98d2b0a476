"""lesionlapse: serial brain MRI lesion tracking."""

__version__ = "0.1.0"
