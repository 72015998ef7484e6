"""DICOM node load check: N series pushed concurrently by K pynetdicom senders into one madclip-dicom-node.

The node runs as its own process (`python -m madclip_runtime.dicomnet.node`, the console script's module) and
sends its results (SEG + SR per series) to a pynetdicom storage SCP in this process, which timestamps them.
Reported: series per minute (first instance pushed to last result received), the time from a series' last
acknowledged instance to its SR arriving (which includes the --quiet period; shown with and without it),
lost and duplicated results (every series must get exactly one SEG and one SR), the senders' C-STORE
latency (the node acknowledges after fsync, without scoring), and the node's peak RSS (os.wait4 on the
process after SIGTERM), which must not grow with N (one series is scored at a time).

    python benchmarks/bench_dicom_node.py            # N = 8 and 24, K = 4, 16 slices of 128 x 128
    python benchmarks/bench_dicom_node.py --series 8 24 --senders 4 --slices 16 --bundle B

Default bundle: the test suite's stand-in ONNX graph (tests/conftest.py `build_tiny_bundle`, 64 px input; no
training), so the figures are the node's own overhead plus a small model; pass --bundle for a real one.
Writes benchmarks/results/dicom_node.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import WORK, console, print_machine, table, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_series(n_slices: int, size: int, seed: int) -> list:
    """One synthetic CT series (pydicom datasets in memory): noise "tissue", a bright blob on one slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n_slices):
        img = (200 + rng.normal(0, 20, (size, size))).astype(np.int16)
        if k == n_slices // 2:
            img[size // 3 : size // 3 + 12, size // 2 : size // 2 + 12] = 1400
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName = f"BENCH{seed:04d}", "Bench^Patient"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20240101", "120000", ""
        ds.Manufacturer, ds.PositionReferenceIndicator = "bench", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, 0, 800, 1600
        ds.PixelData = img.astype("<i2").tobytes()
        out.append(ds)
    return out


class Collector:
    """The receiving PACS: timestamps every SEG / SR and files it under the series it references."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.lock = threading.Lock()
        self.results: dict[str, list[tuple[str, str, float]]] = {}
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)]
        )
        self.port = int(self.server.server_address[1])

    def on_store(self, event) -> int:
        ds = event.dataset
        if ds.Modality == "SEG":
            ref = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        else:
            ref = str(
                ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
            )
        with self.lock:
            self.results.setdefault(ref, []).append(
                (str(ds.Modality), str(ds.SOPInstanceUID), time.perf_counter())
            )
        return 0x0000


def push_series(port: int, datasets: list) -> tuple[float, list[float]]:
    """One association per series. -> (time the last instance was acknowledged, per-instance C-STORE ms)."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(datasets[0].SOPClassUID, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="MADCLIP")
    if not assoc.is_established:
        raise SystemExit("the node refused the association")
    ms = []
    for ds in datasets:
        t0 = time.perf_counter()
        status = assoc.send_c_store(ds)
        ms.append((time.perf_counter() - t0) * 1e3)
        if int(status.Status) != 0:
            raise SystemExit(f"C-STORE answered 0x{int(status.Status):04X}")
    done = time.perf_counter()
    assoc.release()
    return done, ms


def one_run(bundle: Path, n: int, senders: int, slices: int, size: int, quiet: float) -> dict:
    from madclip_runtime.dicomnet.node import local_command

    work = WORK / f"dicom_node_{n}"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    collector = Collector()
    log = work / "node.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            local_command(bundle, collector.port, work / "spool", quiet),
            stdout=f,
            stderr=f,
            env=env,
        )
    port = None
    deadline = time.time() + 120
    while port is None and time.time() < deadline:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        port = int(m.group(1)) if m else None
        if proc.poll() is not None:
            raise SystemExit(log.read_text()[-3000:])
        time.sleep(0.2)
    series = [make_series(slices, size, seed) for seed in range(n)]
    uids = [str(s[0].SeriesInstanceUID) for s in series]
    t_start = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        pushed = list(pool.map(lambda s: push_series(port, s), series))
    last_ack = {uid: done for uid, (done, _) in zip(uids, pushed)}
    deadline = time.time() + 120 + n * 30
    while time.time() < deadline:
        with collector.lock:
            if all(len({m for m, _, _ in collector.results.get(u, [])}) == 2 for u in uids):
                break
        time.sleep(0.1)
    time.sleep(max(1.0, quiet))  # anything late would be a duplicate
    proc.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(proc.pid, 0)
    collector.server.shutdown()
    results = collector.results
    lost = sum(1 for u in uids if len({m for m, _, _ in results.get(u, [])}) < 2)
    dup = sum(max(0, len({sop for _, sop, _ in results.get(u, [])}) - 2) for u in uids)
    sr_at = {
        u: min(t for m, _, t in results[u] if m == "SR")
        for u in uids
        if any(m == "SR" for m, _, _ in results.get(u, []))
    }
    lat = [sr_at[u] - last_ack[u] for u in sr_at]
    store_ms = [x for _, ms in pushed for x in ms]
    t_end = max(sr_at.values()) if sr_at else time.perf_counter()
    return {
        "series": n,
        "senders": senders,
        "slices": slices,
        "size": size,
        "quiet_s": quiet,
        "series_per_minute": n / (t_end - t_start) * 60.0,
        "push_seconds": max(last_ack.values()) - t_start,
        "result_latency_s": {
            "median": statistics.median(lat) if lat else None,
            "max": max(lat) if lat else None,
        },
        "c_store_ms": {
            "median": statistics.median(store_ms),
            "p95": float(np.percentile(store_ms, 95)),
            "max": max(store_ms),
        },
        "lost": lost,
        "duplicated": dup,
        "node_peak_rss_mb": usage.ru_maxrss / 1024,
        "node_exit": os.waitstatus_to_exitcode(status),  # 0: SIGTERM is a clean stop
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="bundle (default: the tests' stand-in graph, built once)")
    ap.add_argument("--series", type=int, nargs="+", default=[8, 24], help="N values (one run each)")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--quiet", type=float, default=2.0, help="the node's --quiet seconds")
    a = ap.parse_args()
    print_machine()
    if a.bundle is None:
        from tests.conftest import build_tiny_bundle

        bundle = WORK / "dicom_node_bundle"
        if not bundle.exists():
            build_tiny_bundle(bundle, size=64)
    else:
        bundle = Path(a.bundle)
    runs = []
    for n in a.series:
        console.print(f"N = {n} series x {a.slices} slices, {a.senders} senders ...")
        runs.append(one_run(bundle, n, a.senders, a.slices, a.size, a.quiet))
    rows = [
        [
            f"N={r['series']}, K={r['senders']}",
            r["series_per_minute"],
            r["push_seconds"],
            r["c_store_ms"]["median"],
            r["c_store_ms"]["p95"],
            r["result_latency_s"]["median"],
            r["result_latency_s"]["max"],
            (r["result_latency_s"]["median"] or 0) - r["quiet_s"],
            r["lost"],
            r["duplicated"],
            r["node_peak_rss_mb"],
        ]
        for r in runs
    ]
    table(
        "madclip-dicom-node load",
        [
            "run",
            "series/min",
            "push s",
            "C-STORE ms med",
            "C-STORE ms p95",
            "last instance -> SR s (med)",
            "max",
            "med - quiet",
            "lost",
            "dup",
            "node peak RSS MB",
        ],
        rows,
    )
    write_json("dicom_node.json", {"bundle": str(bundle), "runs": runs})
    return 0 if all(r["lost"] == 0 and r["duplicated"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
