"""The thresholded anomaly map of a DICOM volume as a DICOM Segmentation object (made with highdicom).

One BINARY segment ("madclip anomaly", category Morphologically Abnormal Structure), one frame per source
slice (empty frames kept, so the SEG has exactly the series' frame count), referencing the source series
and images; the pixel threshold and how it was chosen are written into the segment's Algorithm
Identification parameters and the Content Description. Viewers such as 3D Slicer (QuantitativeReporting),
OHIF and ITK-SNAP (via Slicer/dcmqi) show it over the series. Research use, not for clinical decisions.
"""

from __future__ import annotations

import copy
import importlib
import io
import logging
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..errors import InputError, MadclipError
from .volume import Volume


def _highdicom() -> Any:
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # highdicom narrates each module it copies: -v
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        return importlib.import_module("highdicom")
    except ImportError:
        raise MadclipError(
            '--dicom-seg needs highdicom; install it with: pip install "madclip[medical]"'
        ) from None


def seg_pixels(volume: Volume, planes: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Per-slice maps (slice order, native [R, C]) -> binary frames in the SOURCE's order [N, R, C] uint8.

    Always on the source frames (never the resampled grid of a tilted/uneven stack), so each frame lies on
    its source image."""
    r, c = np.asarray(planes[0]).shape[:2]
    frames = np.zeros((len(planes), r, c), dtype=np.uint8)  # [N, R, C]
    for k, src in enumerate(volume.frame_of_slice or range(len(planes))):  # slice k came from frame `src`
        frames[src] = np.asarray(planes[k]) >= threshold
    return frames


def _thickness(ds: Any, frame: int | None) -> float | None:
    from .medical import first_float, frame_item

    item = frame_item(ds, frame, "PixelMeasuresSequence") if frame is not None else None
    value = first_float(item.get("SliceThickness")) if item is not None else None
    return value if value is not None else first_float(ds.get("SliceThickness"))


def _plane_sequences(hd: Any, volume: Volume) -> dict[str, Any]:
    """Explicit plane orientation, pixel measures and one plane position per SEG frame (source order), from
    madclip's geometry: enhanced multi-frame files keep these per frame, where highdicom does not look."""
    geom = volume.geometry
    if geom is None:
        return {}
    n = len(volume.frame_of_slice)
    position_of_source = [None] * n
    for k, src in enumerate(volume.frame_of_slice):
        position_of_source[src] = geom.positions[k]
    multi = volume.kind == "dicom-multiframe"
    thickness = _thickness(volume.datasets[0], 0 if multi else None)
    if thickness is None or thickness <= 0:
        thickness = float(volume.grid.dz) if volume.grid is not None and volume.grid.dz > 0 else 1.0
    return {
        "plane_orientation": hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=[float(x) for x in (*geom.row_cos, *geom.col_cos)]
        ),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=[float(x) for x in geom.spacing], slice_thickness=float(thickness)
        ),
        "plane_positions": [
            hd.PlanePositionSequence(
                coordinate_system="PATIENT",
                image_position=[float(x) for x in p],
                pixel_matrix_position=(1, 1),
            )
            for p in position_of_source
        ],
    }


def _shared_geometry(ds: Any) -> Any:
    """An enhanced multi-frame header whose shared functional groups hold the pixel measures and plane
    orientation (copied from frame 1 when the scanner wrote them per frame, as Philips does): highdicom
    reads them from the shared groups only. The frames' own values go into the SEG explicitly."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    shared = ds.get("SharedFunctionalGroupsSequence") or []
    missing = [
        name
        for name in ("PixelMeasuresSequence", "PlaneOrientationSequence")
        if not (len(shared) and name in shared[0])
    ]
    if not missing or not len(ds.get("PerFrameFunctionalGroupsSequence", [])):
        return ds
    out = copy.deepcopy(ds)
    if not len(out.get("SharedFunctionalGroupsSequence", [])):
        out.SharedFunctionalGroupsSequence = DicomSequence([Dataset()])
    first = out.PerFrameFunctionalGroupsSequence[0]
    for name in missing:
        if name in first:
            setattr(out.SharedFunctionalGroupsSequence[0], name, copy.deepcopy(first[name].value))
    return out


def dicom_seg_bytes(
    volume: Volume,
    planes: Sequence[np.ndarray],
    threshold: float,
    threshold_method: str,
    model_name: str,
    series_number: int = 9901,
) -> bytes:
    """Build the SEG for `volume` from its per-slice maps (>= `threshold` is the segment) -> Part 10 bytes.

    Works for a series of single-frame images, an enhanced multi-frame image and one 2-D image (one frame)."""
    if not volume.is_dicom:
        raise InputError(
            f"{volume.source}: --dicom-seg needs DICOM input (a DICOM SEG references DICOM images)"
        )
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    sources = volume.datasets  # single-frame files in file order, or the one multi-frame dataset
    if volume.kind == "dicom-multiframe":
        sources = [_shared_geometry(sources[0])]
    pixels = seg_pixels(volume, planes, threshold)
    params = {"map_threshold": f"{threshold:.6g}", "map_threshold_method": threshold_method[:64]}
    algorithm = hd.AlgorithmIdentificationSequence(
        name="madclip", version=__version__, family=codes.cid7162.ArtificialIntelligence, parameters=params
    )
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
            **_plane_sequences(hd, volume),
        )
    except Exception as exc:  # highdicom validates a lot of the sources; any refusal is one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"{volume.source}: cannot build a DICOM SEG for this input ({type(exc).__name__}: {first})"
        ) from None
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def image_volume(path: str, header: Any, pixels: Any) -> Volume:
    """A one-frame DICOM image as a one-slice Volume (for its one-frame SEG)."""
    from .volume import geometry_of, order_and_affine

    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    _, grid, geom, _ = order_and_affine(path, [geometry_of(header)], [0], (rows, cols))
    return Volume(
        path,
        "dicom-image",
        [pixels],
        grid.shape,
        grid.affine,
        path,
        None,
        datasets=[header],
        frame_of_slice=[0],
        grid=grid,
        geometry=geom,
    )
