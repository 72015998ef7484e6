"""The thresholded anomaly map of a DICOM volume as a DICOM Segmentation object (made with highdicom).

One BINARY segment ("madclip anomaly", category Morphologically Abnormal Structure), one frame per source
slice (empty frames kept, so the SEG has exactly the series' frame count), referencing the source series
and images; the pixel threshold and how it was chosen are written into the segment's Algorithm
Identification parameters and the Content Description. Viewers such as 3D Slicer (QuantitativeReporting),
OHIF and ITK-SNAP (via Slicer/dcmqi) show it over the series. Research use, not for clinical decisions.
"""
from __future__ import annotations

import importlib
import io
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputError, MadclipError
from .volume import Volume


def _highdicom() -> Any:
    try:
        return importlib.import_module("highdicom")
    except ImportError:
        raise MadclipError('--dicom-seg needs highdicom; install it with: pip install "madclip[medical]"') from None


def seg_pixels(volume: Volume, arr: np.ndarray, threshold: float) -> np.ndarray:
    """The map array (volume.shape, [R, C, N]) -> binary frames in the SOURCE's order [N, R, C] uint8."""
    frames = np.zeros((volume.n_slices,) + tuple(arr.shape[:2]), dtype=np.uint8)  # [N, R, C]
    for k, src in enumerate(volume.frame_of_slice):  # slice k (normal order) came from file/frame `src`
        frames[src] = arr[:, :, k] >= threshold
    return frames


def dicom_seg_bytes(volume: Volume, arr: np.ndarray, threshold: float, threshold_method: str,
                    model_name: str, series_number: int = 9901) -> bytes:
    """Build the SEG for `volume` from its map array (>= `threshold` is the segment) -> Part 10 bytes."""
    if not volume.is_dicom:
        raise InputError(f"{volume.source}: --dicom-seg needs DICOM input (a DICOM SEG references DICOM images)")
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    sources = volume.datasets  # single-frame files in file order, or the one multi-frame dataset
    pixels = seg_pixels(volume, arr, threshold)
    params = {"map_threshold": f"{threshold:.6g}", "map_threshold_method": threshold_method[:64]}
    algorithm = hd.AlgorithmIdentificationSequence(
        name="madclip", version=__version__, family=codes.cid7162.ArtificialIntelligence, parameters=params)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="madclip anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    description = f"anomaly map >= {threshold:.4g} ({threshold_method})"
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels if len(sources) > 1 or volume.kind == "dicom-multiframe" else pixels[0],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="madclip",
            manufacturer_model_name=model_name[:64] or "madclip",
            software_versions=__version__,
            device_serial_number="none",
            content_description=description[:64],
            content_label="MADCLIP",
            series_description=f"madclip anomaly >= {threshold:.4g}"[:64],
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{volume.source}: cannot build a DICOM SEG for this series ({type(exc).__name__}: {first})") from None
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()
