"""rtqa-node: a DICOM node that reviews radiotherapy plan studies. Research software, not for clinical use."""

__version__ = "0.1.0"
