"""Score one DICOM series as a volume and build its result objects: DICOM SEG and a TID 1500 SR.

Scoring is exactly `madclip-infer`'s volume path (`scans.volume.read_dicom_series`,
`volume_output.score_volume`, `summarize`, `volume_record`); the SEG is `scans.dicom_seg.dicom_seg_bytes`. The
SR is a highdicom Comprehensive 3D SR holding a TID 1500 Measurement Report: one measurement group for the
volume (volume score, decision threshold, decision as a qualitative evaluation) and one per slice (its score,
referencing that slice's source instance, or frame of a multi-frame instance). Method and bundle identity and
the research-use statement are the parameters of the algorithm identification (TID 4019); the evidence
sequence references every source instance. `sr_values` reads those values back (for tests and for users).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from .. import INTENDED_USE, __version__
from ..contract import ANOMALY, FP32, MODEL_FILES, SCORE, SCORE_MAP_MAX
from ..errors import InputError, MadclipError

log = logging.getLogger(__name__)

SCHEME = "99MADCLIP"  # private coding scheme of madclip's concepts (DICOM PS3.16 8.2: "99" prefix)
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9901, 9902
CODE_VOLUME_SCORE = ("VOLSCORE", "madclip volume anomaly score")
CODE_SLICE_SCORE = ("SLICESCORE", "madclip slice anomaly score")
CODE_THRESHOLD = ("THRESHOLD", "madclip decision threshold")
CODE_DECISION = ("DECISION", "madclip decision")
CODE_ANOMALY, CODE_NORMAL = ("ANOMALY", "anomaly"), ("NORMAL", "normal")


@dataclass
class SeriesResult:
    """One scored series: the record madclip-infer prints, and the Part 10 bytes of the result objects."""

    record: dict[str, Any]
    seg: bytes | None
    sr: bytes
    source_sops: list[str] = field(default_factory=list)
    preds: list[Any] = field(default_factory=list)  # per-slice predictions (for --out's map and montage)


def bundle_identity(bundle: Any, precision: str = FP32) -> dict[str, str]:
    """Method, bundle name and the sha256 of the model file in use (from the verified metadata)."""
    files = bundle.meta.get("files") or {}
    model = MODEL_FILES.get(precision, MODEL_FILES[FP32])
    sha = str((files.get(model) or {}).get("sha256", "")) or "unrecorded"
    return {
        "method": bundle.method,
        "bundle": os.path.basename(os.path.normpath(bundle.path)),
        "model": model,
        "model_sha256": sha,
    }


def _code(pair: tuple[str, str]) -> Any:
    from pydicom.sr.coding import Code

    return Code(pair[0], SCHEME, pair[1])


def sr_bytes(volume: Any, record: dict[str, Any], identity: dict[str, str]) -> bytes:
    """The TID 1500 measurement report for a scored DICOM volume -> Part 10 bytes."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    unit = Code("1", "UCUM", "no units")
    params = [
        f"method={identity['method']}",
        f"bundle={identity['bundle']}",
        f"model={identity['model']}",
        f"model_sha256={identity['model_sha256']}",
        f"score={record['score_name']}",
        f"volume_score={record['volume_score_method']}",
        f"intended_use={INTENDED_USE}",
    ]
    algo = hd.sr.AlgorithmIdentification(name="madclip", version=__version__, parameters=params)
    sources = volume.datasets
    multiframe = volume.kind == "dicom-multiframe"

    def source_ref(k: int) -> Any:
        src = volume.frame_of_slice[k]
        if multiframe:
            return hd.sr.SourceImageForMeasurement.from_source_image(
                sources[0], referenced_frame_numbers=[src + 1]
            )
        return hd.sr.SourceImageForMeasurement.from_source_image(sources[src])

    vol_measurements = []
    if record["volume_score"] is not None:
        vol_measurements.append(
            hd.sr.Measurement(
                name=_code(CODE_VOLUME_SCORE), value=record["volume_score"], unit=unit, algorithm_id=algo
            )
        )
    if record["threshold"] is not None:
        vol_measurements.append(
            hd.sr.Measurement(
                name=_code(CODE_THRESHOLD), value=float(record["threshold"]), unit=unit, algorithm_id=algo
            )
        )
    evaluations = []
    if record["label"] is not None:
        value = CODE_ANOMALY if record["label"] == ANOMALY else CODE_NORMAL
        evaluations.append(hd.sr.QualitativeEvaluation(name=_code(CODE_DECISION), value=_code(value)))
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="madclip volume"),
            finding_type=codes.SCT.MorphologicallyAbnormalStructure,
            algorithm_id=algo,
            measurements=vol_measurements or None,
            qualitative_evaluations=evaluations or None,
        )
    ]
    for k, s in enumerate(record["slices"]):
        if s[SCORE] is None:
            continue
        value = s[SCORE] if record["score_name"] == SCORE else s[SCORE_MAP_MAX]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"madclip slice {k}"),
                algorithm_id=algo,
                measurements=[
                    hd.sr.Measurement(
                        name=_code(CODE_SLICE_SCORE),
                        value=float(value),
                        unit=unit,
                        referenced_images=[source_ref(k)],
                    )
                ],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="madclip", manufacturer_name="madclip", model_name=identity["method"][:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=Code("363679005", "SCT", "Imaging"),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="madclip",
        is_complete=True,
        series_description=f"madclip anomaly report ({INTENDED_USE})"[:64],
    )
    buf = io.BytesIO()
    sr.save_as(buf)
    return buf.getvalue()


def _walk(items: Sequence[Any]):
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def sr_values(ds: Any) -> dict[str, Any]:
    """Read madclip's values back from an SR dataset: volume score, threshold, decision, slice scores
    (with the SOP instance and frame each references) and the algorithm parameters."""
    from pydicom.multival import MultiValue

    out: dict[str, Any] = {
        "volume_score": None,
        "threshold": None,
        "decision": None,
        "slices": [],
        "parameters": [],
    }
    for item in _walk(ds.ContentSequence):
        name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        if name is None:
            continue
        if item.ValueType == "NUM" and name.CodingSchemeDesignator == SCHEME:
            value = float(item.MeasuredValueSequence[0].NumericValue)
            if name.CodeValue == CODE_VOLUME_SCORE[0]:
                out["volume_score"] = value
            elif name.CodeValue == CODE_THRESHOLD[0]:
                out["threshold"] = value
            elif name.CodeValue == CODE_SLICE_SCORE[0]:
                ref = next(i for i in item.ContentSequence if i.ValueType == "IMAGE").ReferencedSOPSequence[0]
                raw = ref.get("ReferencedFrameNumber")
                frames = (
                    [] if raw is None else [int(f) for f in (raw if isinstance(raw, MultiValue) else [raw])]
                )
                out["slices"].append(
                    {SCORE: value, "sop": str(ref.ReferencedSOPInstanceUID), "frames": frames}
                )
        elif (
            item.ValueType == "CODE"
            and name.CodeValue == CODE_DECISION[0]
            and name.CodingSchemeDesignator == SCHEME
        ):
            out["decision"] = str(item.ConceptCodeSequence[0].CodeMeaning)
        elif item.ValueType == "TEXT" and name.CodeValue == "111002":  # Algorithm Parameters
            if item.TextValue not in out["parameters"]:
                out["parameters"].append(str(item.TextValue))
    return out


def read_series(files: Sequence[str], window: str = "auto", name: str | None = None) -> Any:
    """The files of ONE series (single-frame files, or one multi-frame file) -> a Volume (else InputError)."""
    from ..scans.volume import group_series, read_dicom_series

    groups, bad = group_series(list(files))
    if bad:
        raise InputError(f"{bad[0]}: not a readable DICOM file")
    if len(groups) != 1:
        raise InputError(f"{len(groups)} series among the files given; one expected")
    return read_dicom_series(groups[0], window, name=name)


def score_series(
    volume: Any,
    predictor: Any,
    bundle: Any,
    volume_score: str = "max",
    map_threshold: float | None = None,
    objects: bool = True,
) -> SeriesResult:
    """Score a read DICOM volume like `madclip-infer` and build the SEG (when a map threshold is known) and SR
    (`objects=False`: the record and predictions only; `seg` and `sr` are then None and empty)."""
    from ..scans.dicom_seg import dicom_seg_bytes
    from ..scans.volume_output import parse_volume_score, score_volume, summarize, volume_record

    if not volume.is_dicom:
        raise MadclipError(f"{volume.source}: results go to a PACS only for DICOM input")
    preds = score_volume(predictor, volume)
    record = volume_record(
        volume,
        summarize(volume, preds, parse_volume_score(volume_score), predictor.threshold, predictor.score_name),
        predictor,
    )
    identity = bundle_identity(bundle, predictor.precision)
    record["bundle_identity"] = identity
    sops = [str(d.SOPInstanceUID) for d in volume.datasets]
    if not objects:
        return SeriesResult(record, None, b"", sops, list(preds))
    map_t, how = (
        (map_threshold, "given with --map-threshold")
        if map_threshold is not None
        else (bundle.map_threshold, "bundle calibration")
    )
    seg = None
    if map_t is None:
        log.warning(
            "%s: no DICOM SEG: the bundle has no calibrated map threshold (give --map-threshold); "
            "the SR is still sent",
            volume.series_uid,
        )
    else:
        planes = [
            p.anomaly_map for p in preds
        ]  # slice order, each at the slice's native size (as madclip-infer)
        model = f"madclip {identity['method']}"
        seg = dicom_seg_bytes(volume, planes, float(map_t), how, model, series_number=SEG_SERIES_NUMBER)
    sr = sr_bytes(volume, record, identity)
    return SeriesResult(record, seg, sr, sops, list(preds))
