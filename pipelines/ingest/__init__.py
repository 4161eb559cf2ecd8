"""Registering a site's images: scan DICOM and NIfTI sources into validated cases and a rejection list.

``scan.scan_images`` / ``scan.scan_datalist`` are the entry points; ``dicom`` reads one DICOM header,
``series`` turns DICOM files into volumes, ``nifti`` reads one NIfTI header. Nothing here writes
anywhere: the silo's registry (silo_agent.registry) stores what a scan found, with keyed hashes in
place of UIDs and patient-derived values.
"""

from pipelines.ingest.dicom import Rejection
from pipelines.ingest.scan import ScanResult, ScannedCase, scan_datalist, scan_images
from pipelines.ingest.series import ImageSource

__all__ = ["ImageSource", "Rejection", "ScanResult", "ScannedCase", "scan_datalist", "scan_images"]
