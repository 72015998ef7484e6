"""madclip-dicom-node (issue 24) against a real Orthanc and real pynetdicom peers.

The round trip: real-scan slices (../shared/data/realscans) as a CT series plus a highdicom-generated enhanced
multi-frame series (and a DICOM SEG, a non-image, in the same study) are uploaded to Orthanc, which forwards
each study to the node with its REST `/modalities/{id}/store`; the node sends SEG + SR back to Orthanc by
C-STORE; the test reads them back and checks references, SEG frames (highdicom) and the SR's score against
the local `madclip-infer` run. The failure cases (incomplete series, geometry, over-limit, dropped and aborted
associations, refused AE title, failed sends retried from the outbox, SIGTERM/SIGKILL and restart, TLS, no
patient identifier in any log) each have a test with pynetdicom peers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pynetdicom", reason="pynetdicom (madclip[pacs]) not installed")
hd = pytest.importorskip("highdicom", reason="highdicom (madclip[medical]) not installed")
pydicom = pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")

from madclip_runtime.dicomnet.node import (  # noqa: E402
    DicomNode,
    NodeOptions,
    local_command,
    parse_destination,
)
from madclip_runtime.dicomnet.results import sr_values  # noqa: E402

from .conftest import lesion_volume, write_dicom_series  # noqa: E402
from .orthanc import (  # noqa: E402
    SECRET_ID,
    SECRET_NAME,
    OrthancServer,
    enhanced_multiframe,
    free_port,
    realscan_series,
    set_patient,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(standin):
    from madclip_runtime.bundles.bundle import load_bundle
    from madclip_runtime.predictor import load

    bundle = load_bundle(str(standin))
    return bundle, load(bundle, backend="ort-cpu")


class Receiver:
    """A pynetdicom storage SCP standing in for a PACS: keeps every dataset it receives."""

    def __init__(self, port: int = 0, ae_title: str = "PACS", ssl_context=None) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.datasets: list = []
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.datasets.append(ds)
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
            ssl_context=ssl_context,
        )
        self.port = int(self.server.server_address[1])

    def wait(self, n: int, timeout: float = 60.0) -> list:
        deadline = time.time() + timeout
        while len(self.datasets) < n and time.time() < deadline:
            time.sleep(0.1)
        return self.datasets

    def stop(self) -> None:
        self.server.shutdown()


def push(port: int, items, ae: str = "MODALITY", called: str = "MADCLIP", tls=None) -> list[int]:
    """C-STORE files or datasets to the node in one association. -> statuses (empty list: not associated)."""
    from pynetdicom import AE

    datasets = [d if isinstance(d, pydicom.Dataset) else pydicom.dcmread(d) for d in items]
    scu = AE(ae_title=ae)
    for uid in {str(d.SOPClassUID) for d in datasets}:
        scu.add_requested_context(uid, ["1.2.840.10008.1.2.1"])
    assoc = scu.associate("127.0.0.1", port, ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return []
    out = [int(assoc.send_c_store(d).Status) for d in datasets]
    assoc.release()
    return out


def make_node(tmp_path, loaded, send_port: int, **kw) -> DicomNode:
    bundle, predictor = loaded
    opts = dict(
        spool=str(tmp_path / "spool"),
        host="127.0.0.1",
        port=0,
        send_to=parse_destination(f"PACS@127.0.0.1:{send_port}"),
        allow=("MODALITY", "ORTHANC"),
        quiet=0.5,
        retry_min=0.2,
        retry_max=1.0,
    )
    opts.update(kw)
    node = DicomNode(NodeOptions(**opts), predictor, bundle)
    node.start()
    return node


def wait_for(cond, timeout: float = 60.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def local_infer(bundle: Path, source: Path, out: Path) -> dict:
    """The local madclip-infer run on the same series (its JSON record; the SEG in `out`)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "madclip_runtime.cli.infer",
            str(source),
            "--bundle",
            str(bundle),
            "--backend",
            "ort-cpu",
            "--out",
            str(out),
            "--dicom-seg",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return rec


def results_for(sources: list[Path], segs: list, srs: list) -> tuple[list, str, Any, Any]:
    """The source headers and series UID of one series, and the one SEG and one SR that reference it."""
    srcs = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    uid = str(srcs[0].SeriesInstanceUID)
    (seg,) = [s for s in segs if s.ReferencedSeriesSequence[0].SeriesInstanceUID == uid]
    (sr,) = [
        s
        for s in srs
        if s.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    ]
    return srcs, uid, seg, sr


def check_results(seg, sr, rec: dict, local_seg: Path, sources: list) -> None:
    """SEG + SR of one series: references, SEG frames as the local run's, SR score equal to the local one."""
    sops = {str(d.SOPInstanceUID) for d in sources}
    series_uid = str(sources[0].SeriesInstanceUID)
    seg = hd.seg.Segmentation.from_dataset(seg)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert {
        i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    } == sops
    ref = hd.seg.segread(local_seg)
    if len(sources) > 1:  # single-frame series: the frame of every source instance
        for sop in sorted(sops):
            got = seg.get_pixels_by_source_instance([sop], segment_numbers=[1])
            want = ref.get_pixels_by_source_instance([sop], segment_numbers=[1])
            np.testing.assert_array_equal(got, want)
    else:  # enhanced multi-frame: every source frame
        n = int(sources[0].NumberOfFrames)
        got = seg.get_pixels_by_source_frame(list(sops)[0], list(range(1, n + 1)), segment_numbers=[1])
        want = ref.get_pixels_by_source_frame(list(sops)[0], list(range(1, n + 1)), segment_numbers=[1])
        np.testing.assert_array_equal(got, want)
    assert int(seg.NumberOfFrames) == int(ref.NumberOfFrames)
    v = sr_values(sr)
    assert v["volume_score"] == pytest.approx(rec["volume_score"], abs=1e-6)
    assert v["threshold"] == pytest.approx(rec["threshold"])
    assert v["decision"] == rec["label"]
    assert len(v["slices"]) == rec["n_slices"]
    assert [s["score"] for s in v["slices"]] == pytest.approx([s["score"] for s in rec["slices"]], abs=1e-6)
    assert {s["sop"] for s in v["slices"]} == sops
    if len(sources) == 1:  # multi-frame: one slice score per source frame
        assert sorted(f for s in v["slices"] for f in s["frames"]) == list(
            range(1, int(sources[0].NumberOfFrames) + 1)
        )
    assert any("research use, not for clinical decisions" in p for p in v["parameters"])
    assert any(p.startswith("model_sha256=") for p in v["parameters"])
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == sops


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_orthanc_forwards_studies_node_sends_seg_and_sr_back(standin, loaded, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    orthanc = OrthancServer(tmp_path / "orthanc")
    node = None
    try:
        brain, _ = realscan_series(tmp_path / "brain", "brain1")
        set_patient(brain)
        lung, _ = realscan_series(tmp_path / "lung_sf", "lung1", every=4)
        (tmp_path / "mf").mkdir()
        mf = enhanced_multiframe(tmp_path / "mf" / "lung_mf.dcm", lung)
        set_patient([mf])
        rec_brain = local_infer(standin, tmp_path / "brain", tmp_path / "local")
        rec_mf = local_infer(standin, mf, tmp_path / "local")
        # a non-image in the brain study: the local SEG (Orthanc must still forward the whole study)
        orthanc.upload(brain + [mf, tmp_path / "local" / "brain_seg.dcm"])
        local_seg_uid = str(pydicom.dcmread(tmp_path / "local" / "brain_seg.dcm").SOPInstanceUID)

        node = make_node(tmp_path, loaded, orthanc.dicom_port, quiet=1.0)
        node.o.send_to = parse_destination(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        orthanc.add_modality("madclip", "MADCLIP", node.port)
        for study in orthanc.get("/studies"):
            res = orthanc.store_to("madclip", [study])
            assert res["status"] == 200, res  # every object acknowledged: Orthanc's forward succeeded

        def results():
            segs = [
                d for d in orthanc.instances_with_modality("SEG") if str(d.SOPInstanceUID) != local_seg_uid
            ]
            return segs, orthanc.instances_with_modality("SR")

        assert wait_for(lambda: [len(x) for x in results()] == [2, 2], 120), caplog.text[-3000:]
        time.sleep(1.5)  # nothing more arrives (no duplicates)
        segs, srs = results()
        assert len(segs) == 2 and len(srs) == 2
        for sources, rec, local in ((brain, rec_brain, "brain_seg.dcm"), ([mf], rec_mf, "lung_mf_seg.dcm")):
            srcs, uid, seg, sr = results_for(sources, segs, srs)
            assert str(seg.StudyInstanceUID) == str(sr.StudyInstanceUID) == str(srcs[0].StudyInstanceUID)
            check_results(seg, sr, rec, tmp_path / "local" / local, srcs)
        assert "is not an image: acknowledged, not scored" in caplog.text
        assert not os.listdir(tmp_path / "spool" / "outbox") and not os.listdir(
            tmp_path / "spool" / "incoming"
        )
        assert SECRET_NAME.split("^")[0] not in caplog.text and SECRET_ID not in caplog.text
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def _series(tmp_path: Path, name: str, n: int = 4, **kw) -> tuple[list[Path], str]:
    vol, _ = lesion_volume(shape=(24, 20, n), lesion_slice=1)
    paths, uid = write_dicom_series(
        tmp_path / name, np.transpose(vol, (2, 1, 0)).copy(), patient=SECRET_ID, **kw
    )
    set_patient(paths)
    return paths, uid


def test_incomplete_geometry_nonimage_overlimit_each_one_log_line(loaded, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    pacs = Receiver()
    node = make_node(tmp_path, loaded, pacs.port, min_slices=3, max_instances=5)
    try:
        one, uid1 = _series(tmp_path, "one", n=1)
        assert push(node.port, one) == [0]
        broken, uid2 = _series(tmp_path, "broken", n=4)
        ds = pydicom.dcmread(broken[2])
        ds.ImagePositionPatient = pydicom.dcmread(
            broken[1]
        ).ImagePositionPatient  # two slices at one position
        ds.save_as(broken[2], enforce_file_format=True)
        assert push(node.port, broken) == [0, 0, 0, 0]
        big, uid3 = _series(tmp_path, "big", n=7)
        assert push(node.port, big) == [0] * 5 + [0xA700] * 2
        good, uid4 = _series(tmp_path, "good", n=4)
        assert push(node.port, good) == [0] * 4
        received = pacs.wait(2)
        assert wait_for(lambda: node.stats["failed"] == 3)
        assert f"series {uid1}: not scored: incomplete: 1 frame(s)" in caplog.text
        assert (
            f"series {uid2}: not scored: not one volume" in caplog.text
            and "share the position" in caplog.text
        )
        assert f"series {uid3}: over the limit of 5 instances" in caplog.text
        assert f"series {uid3}: not scored: more than 5 instances" in caplog.text
        assert len(received) == 2 and {d.Modality for d in received} == {"SEG", "SR"}
        assert (
            received[0].ReferencedSeriesSequence[0].SeriesInstanceUID == uid4
            or received[1].ReferencedSeriesSequence[0].SeriesInstanceUID == uid4
        )
        failed = sorted(os.listdir(tmp_path / "spool" / "failed"))
        assert len(failed) == 3 and all(
            (tmp_path / "spool" / "failed" / f / "reason.txt").exists() for f in failed
        )
        assert SECRET_ID not in caplog.text and "Secretname" not in caplog.text
    finally:
        node.stop()
        pacs.stop()


def test_non_image_objects_are_acknowledged_not_scored(loaded, standin, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    pacs = Receiver()
    node = make_node(tmp_path, loaded, pacs.port)
    try:
        paths, _ = _series(tmp_path, "ct", n=3)
        rec = local_infer(standin, tmp_path / "ct", tmp_path / "local")
        assert rec["n_slices"] == 3
        seg = pydicom.dcmread(tmp_path / "local" / "ct_seg.dcm")
        assert push(node.port, [seg]) == [0]
        assert (
            "Segmentation Storage" in caplog.text
            and "is not an image: acknowledged, not scored" in caplog.text
        )
        time.sleep(1.5)
        assert (
            node.stats["scored"] == 0
            and not os.listdir(tmp_path / "spool" / "incoming")
            and not pacs.datasets
        )
    finally:
        node.stop()
        pacs.stop()


def test_refused_calling_ae_title_and_dropped_associations_keep_the_node_alive(loaded, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    pacs = Receiver()
    node = make_node(tmp_path, loaded, pacs.port, quiet=4.0)
    try:
        paths, uid = _series(tmp_path, "ct", n=4)
        assert push(node.port, paths, ae="INTRUDER") == []  # rejected association
        assert "calling AE title 'INTRUDER' is not in --allow" in caplog.text
        # a peer that aborts after two instances
        from pynetdicom import AE

        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(pydicom.dcmread(paths[0]).SOPClassUID, ["1.2.840.10008.1.2.1"])
        assoc = scu.associate("127.0.0.1", node.port, ae_title="MADCLIP")
        assert [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths[:2]] == [0, 0]
        assoc.abort()
        assert wait_for(
            lambda: "aborted or dropped by the peer before release; the 2 instance(s)" in caplog.text, 10
        )
        # a peer whose TCP connection just drops mid-PDU
        assoc = scu.associate("127.0.0.1", node.port, ae_title="MADCLIP")
        assert int(assoc.send_c_store(pydicom.dcmread(paths[2])).Status) == 0
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        assoc.dul.socket.socket.close()
        assert wait_for(lambda: "before release; the 1 instance(s)" in caplog.text, 15), caplog.text[-2000:]
        with socket.create_connection(("127.0.0.1", node.port)) as s:
            s.sendall(b"\x01\x00\x00\x00\x10\x00garbage")  # half an A-ASSOCIATE-RQ, then gone
        # the node still works: the last instance completes the series, which is scored from all four
        assert push(node.port, paths[3:]) == [0]
        received = pacs.wait(2)
        assert len(received) == 2
        sr = [d for d in received if d.Modality == "SR"][0]
        assert len(sr_values(sr)["slices"]) == 4
    finally:
        node.stop()
        pacs.stop()


def test_failed_send_is_retried_from_the_outbox(loaded, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    port = free_port()  # nothing listens there yet
    node = make_node(tmp_path, loaded, port)
    pacs = None
    try:
        paths, uid = _series(tmp_path, "ct", n=3)
        assert push(node.port, paths) == [0, 0, 0]
        assert wait_for(lambda: "kept in the outbox" in caplog.text, 30)
        assert len(os.listdir(tmp_path / "spool" / "outbox")) == 1
        time.sleep(1.5)
        assert "retry 2" in caplog.text or "retry 3" in caplog.text  # backoff keeps trying
        pacs = Receiver(port)
        received = pacs.wait(2, 30)
        assert len(received) == 2 and {d.Modality for d in received} == {"SEG", "SR"}
        assert wait_for(lambda: not os.listdir(tmp_path / "spool" / "outbox"), 10)
        (sent,) = os.listdir(tmp_path / "spool" / "sent")
        assert json.loads((tmp_path / "spool" / "sent" / sent).read_text())["series_uid"] == uid
        time.sleep(1.0)
        assert len(pacs.datasets) == 2  # sent once
    finally:
        node.stop()
        if pacs is not None:
            pacs.stop()


def _node_process(
    standin: Path, spool: Path, send_port: int, quiet: float, log: Path
) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    f = open(log, "ab")
    proc = subprocess.Popen(
        local_command(standin, send_port, spool, quiet, "--retry-min", "0.2", "-v"),
        stdout=f,
        stderr=f,
        env=env,
    )
    f.close()
    deadline = time.time() + 120
    while time.time() < deadline:
        text = log.read_text(errors="replace")
        marks = [line for line in text.splitlines() if "listening on 127.0.0.1:" in line]
        if marks and len(marks) > text.count("=== restart"):
            return proc, int(marks[-1].split("listening on 127.0.0.1:")[1].split(";")[0].split()[0])
        if proc.poll() is not None:
            raise AssertionError(text[-2000:])
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("node did not start")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_node_keeps_received_instances_and_resumes_them(standin, tmp_path, sig):
    pacs = Receiver()
    log = tmp_path / "node.log"
    spool = tmp_path / "spool"
    proc, port = _node_process(standin, spool, pacs.port, 300.0, log)  # never quiet before the signal
    try:
        paths, uid = _series(tmp_path, "ct", n=5)
        assert push(port, paths) == [0] * 5
        proc.send_signal(sig)
        rc = proc.wait(60)
        assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL)  # SIGTERM: a clean stop
        (key,) = os.listdir(spool / "incoming")
        assert len(os.listdir(spool / "incoming" / key)) == 5  # every acknowledged instance is on disk
        if sig == signal.SIGTERM:
            assert "1 series waiting in the spool" in log.read_text()
        with open(log, "a") as f:
            f.write("=== restart\n")
        proc, port = _node_process(standin, spool, pacs.port, 0.5, log)
        received = pacs.wait(2, 90)
        assert len(received) == 2
        sr = [d for d in received if d.Modality == "SR"][0]
        assert {s["sop"] for s in sr_values(sr)["slices"]} == {
            str(pydicom.dcmread(p).SOPInstanceUID) for p in paths
        }
        text = log.read_text()
        assert "resuming 1 series received before the restart" in text
        assert SECRET_ID not in text and "Secretname" not in text
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        pacs.stop()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cp, kp = tmp_path / "cert.pem", tmp_path / "key.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cp, kp


def test_tls_offered_and_verified(loaded, tmp_path, caplog):
    import ssl

    pytest.importorskip("cryptography")
    from madclip_runtime.dicomnet.node import client_ssl_context, server_ssl_context

    cert, key = _self_signed(tmp_path)
    pacs = Receiver(ssl_context=server_ssl_context(str(cert), str(key), None))  # results go over TLS too
    node = make_node(
        tmp_path,
        loaded,
        pacs.port,
        server_ssl=server_ssl_context(str(cert), str(key), None),
        send_ssl=client_ssl_context(str(cert)),
    )
    try:
        paths, uid = _series(tmp_path, "ct", n=3)
        assert push(node.port, paths[:1]) == []  # plain DICOM to a TLS port: no association
        untrusted = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH
        )  # system CAs: our cert is not among them
        assert push(node.port, paths[:1], tls=(untrusted, "127.0.0.1")) == []
        assert push(node.port, paths, tls=(client_ssl_context(str(cert)), "127.0.0.1")) == [0, 0, 0]
        received = pacs.wait(2)
        assert {d.Modality for d in received} == {"SEG", "SR"}
    finally:
        node.stop()
        pacs.stop()


def test_cli_refuses_bad_options_in_one_line(standin, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, needle in (
        (["--send-to", "PACS@127.0.0.1:4242"], "--allow"),
        (["--send-to", "nohost", "--allow-any"], "--send-to must be AE@host:port"),
        (["--send-to", "P@h:1", "--allow", "A", "--tls-cert", "x.pem"], "--tls-cert and --tls-key"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "madclip_runtime.dicomnet.node", "--bundle", str(standin), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
        assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1


def test_crash_after_commit_before_cleanup_neither_rescored_nor_lost(loaded, tmp_path, caplog):
    """The window between committing the outbox item and deleting the incoming instances: after a restart the
    leftovers are removed (not scored twice), the pending item is sent, and a later re-send of the same
    instances is a new series to score (its files are newer than the committed result)."""
    caplog.set_level(logging.INFO)
    from madclip_runtime.dicomnet.spool import Spool, series_key

    paths, uid = _series(tmp_path, "ct", n=3)
    spool = Spool(str(tmp_path / "spool"))
    key = series_key(uid)
    files = [
        spool.store_instance(key, str(pydicom.dcmread(p).SOPInstanceUID), p.read_bytes())[0] for p in paths
    ]
    old = time.time() - 60
    for f in files:
        os.utime(f, (old, old))
    pacs = Receiver()
    bundle, predictor = loaded
    from madclip_runtime.dicomnet.results import read_series, score_series

    result = score_series(read_series(files), predictor, bundle)
    spool.commit_result(
        key,
        {"sr.dcm": result.sr, "seg.dcm": result.seg},
        {"series_uid": uid, "instance_files": files, "committed_at": time.time() - 30},
    )
    node = make_node(tmp_path, loaded, pacs.port)  # the "restart"
    try:
        assert "already scored before the restart removed" in caplog.text
        received = pacs.wait(2, 30)
        assert len(received) == 2 and not os.listdir(tmp_path / "spool" / "incoming")
        time.sleep(1.5)
        assert node.stats["scored"] == 0 and len(pacs.datasets) == 2
        assert push(node.port, paths) == [0, 0, 0]  # sent again later: scored again, as a new request
        assert len(pacs.wait(4, 30)) == 4
    finally:
        node.stop()
        pacs.stop()


def test_orthanc_lua_autorouting_from_the_docs_does_not_loop(loaded, tmp_path, caplog):
    """docs/hospital.md's Lua script: Orthanc forwards each stored image to the node; results come once."""
    caplog.set_level(logging.INFO)
    doc = (ROOT / "docs" / "hospital.md").read_text()
    lua = doc.split("```lua\n")[1].split("```")[0]
    node_port = free_port()
    orthanc = OrthancServer(
        tmp_path / "orthanc", lua=lua, modalities={"madclip": ["MADCLIP", "127.0.0.1", node_port]}
    )
    node = None
    try:
        node = make_node(tmp_path, loaded, orthanc.dicom_port, port=node_port, quiet=2.0)
        node.o.send_to = parse_destination(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        paths, uid = _series(tmp_path, "ct", n=4)
        orthanc.upload(paths)
        assert wait_for(lambda: len(orthanc.instances_with_modality("SR")) == 1, 90), caplog.text[-2000:]
        time.sleep(6)  # had the results been routed back, the series would be scored again by now
        assert node.stats["scored"] == 1 and len(orthanc.instances_with_modality("SEG")) == 1
        assert len(orthanc.instances_with_modality("SR")) == 1 and node.stats["not_scored"] == 0
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


@pytest.mark.parametrize(
    "option, values",
    [
        ("--quiet", ["nan", "inf", "-1", "abc"]),
        ("--port", ["-1", "70000", "x"]),
        ("--max-instances", ["0", "-3"]),
        ("--max-mb", ["0"]),
        ("--min-slices", ["0"]),
        ("--retry-min", ["0", "nan"]),
        ("--retry-max", ["-1", "inf"]),
        ("--threshold", ["nan", "-1"]),
        ("--map-threshold", ["nan", "-1"]),
    ],
)
def test_numeric_options_refused_in_one_line(capsys, option, values):
    from madclip_runtime.dicomnet.node import main

    for value in values:
        with pytest.raises(SystemExit) as ei:
            main(["--bundle", "b", "--send-to", "P@h:1", "--allow", "A", f"{option}={value}"])
        assert ei.value.code == 2, (option, value)
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and option in lines[0] and "Traceback" not in err, (option, value, err)
