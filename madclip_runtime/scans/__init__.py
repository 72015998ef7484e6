"""Scan and volume input/output: 2-D images, DICOM, NIfTI, volumes, DICOM SEG, madclip-prepare's slicing."""
