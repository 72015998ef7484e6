"""A real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) for the PACS tests, on free loopback ports.

`OrthancServer(tmp)` writes a generated configuration (temporary storage and index folders, DICOMweb
enabled, DICOM and HTTP ports picked free, optional HTTP basic-auth user) and starts /usr/sbin/Orthanc;
`orthanc_or_skip()` skips with the reason when the binary or the DICOMweb plugin is absent. REST helpers
upload instances, declare modalities, forward (C-STORE from Orthanc) and read instances back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ORTHANC_BIN = os.environ.get("MADCLIP_ORTHANC", "/usr/sbin/Orthanc")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/lib/x86_64-linux-gnu/orthanc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicomweb_plugin() -> str | None:
    for d in PLUGIN_DIRS:
        p = Path(d)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.name.startswith("libOrthancDicomWeb.so"):
                    return str(f)
    return None


def orthanc_or_skip() -> str:
    binary = ORTHANC_BIN if os.path.exists(ORTHANC_BIN) else shutil.which("Orthanc")
    if not binary:
        pytest.skip(
            f"Orthanc not installed ({ORTHANC_BIN}; Debian: apt-get install orthanc orthanc-dicomweb)"
        )
    plugin = dicomweb_plugin()
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin not installed (Debian: apt-get install orthanc-dicomweb)")
    return binary


class OrthancServer:
    """One Orthanc process with its own storage; `rest` speaks to its REST API with `requests`."""

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        users: dict[str, str] | None = None,
        lua: str | None = None,
        modalities: dict[str, list] | None = None,
    ) -> None:
        import requests

        self.binary = orthanc_or_skip()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.session = requests.Session()
        if users:
            self.session.auth = next(iter(users.items()))
        config = {
            "Name": "madclip-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomScuTimeout": 10,
            "HttpTimeout": 60,
            "StableAge": 1,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
            "DicomModalities": modalities or {},
            "DicomModalitiesInDatabase": False,
            "OverwriteInstances": True,
            "ConcurrentJobs": 2,
            "HttpServerThreads": 8,
        }
        if lua:
            (self.workdir / "route.lua").write_text(lua)
            config["LuaScripts"] = [str(self.workdir / "route.lua")]
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, str(self.config_path)], stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited ({self.proc.returncode}); see {self.workdir / 'orthanc.log'}"
                )
            try:
                if self.session.get(f"{self.url}/system", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("Orthanc did not answer within 60 s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    # ------------------------------------------------------------------------------------------- REST
    def get(self, path: str, **kw: Any) -> Any:
        r = self.session.get(f"{self.url}{path}", timeout=60, **kw)
        r.raise_for_status()
        return r.json()

    def upload(self, files: list[Path] | list[bytes]) -> list[str]:
        """POST /instances for each file (or bytes). -> Orthanc instance ids."""
        ids = []
        for f in files:
            data = f if isinstance(f, (bytes, bytearray)) else Path(f).read_bytes()
            r = self.session.post(f"{self.url}/instances", data=data, timeout=60)
            r.raise_for_status()
            ids.append(r.json()["ID"])
        return ids

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        r = self.session.put(
            f"{self.url}/modalities/{name}",
            timeout=30,
            data=json.dumps({"AET": aet, "Host": host, "Port": port}),
        )
        r.raise_for_status()

    def store_to(self, modality: str, resources: list[str], timeout: float = 120) -> dict:
        """Orthanc sends the resources (study/series/instance ids) by C-STORE to `modality` (synchronous)."""
        r = self.session.post(
            f"{self.url}/modalities/{modality}/store",
            timeout=timeout,
            data=json.dumps({"Resources": resources, "Synchronous": True}),
        )
        return {"status": r.status_code, "body": r.text}

    def series_of_study(self, study_uid: str) -> list[dict]:
        found = self.session.post(
            f"{self.url}/tools/find",
            timeout=30,
            data=json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}),
        )
        found.raise_for_status()
        return found.json()

    def instances_with_modality(self, modality: str) -> list[Any]:
        """Every instance of that Modality (SEG, SR) as a pydicom dataset."""
        import io

        import pydicom

        out = []
        for s in self.get("/series?expand"):
            if s["MainDicomTags"].get("Modality") == modality:
                for iid in s["Instances"]:
                    data = self.session.get(f"{self.url}/instances/{iid}/file", timeout=60).content
                    out.append(pydicom.dcmread(io.BytesIO(data)))
        return out


# ------------------------------------------------------------------------------------------- test data


SECRET_NAME, SECRET_ID = "Secretname^Patientperson", "PHI-7734219"  # must never appear in any log


def realscan_series(
    folder: Path, case: str = "brain1", every: int = 1, study_uid: str | None = None, series_number: int = 1
) -> tuple[list[Path], str]:
    """The real-scan PNG slices of `case` (../shared/data/realscans) as a single-frame CT series.

    Slice k is the PNG with z index k (every `every`-th), grey value x 6 as CT numbers (window 800/1600).
    Patient name and ID are the SECRET_* values the log tests look for. -> (paths in slice order, series UID).
    """
    import numpy as np
    from PIL import Image

    from .conftest import realscans_or_skip, write_dicom_series

    root = realscans_or_skip()
    files = sorted(root.rglob(f"img/{case}_z*.png"), key=lambda q: int(q.stem.split("_z")[1]))[::every]
    if len(files) < 3:
        pytest.skip(f"fewer than 3 {case} slices in the real scans")
    frames = np.stack(
        [np.asarray(Image.open(f).convert("L"), dtype=np.int16) * 6 for f in files]
    )  # [N, R, C]
    return write_dicom_series(
        folder, frames, study_uid=study_uid, series_number=series_number, patient=SECRET_ID, **{}
    )


def set_patient(paths: list[Path]) -> None:
    import pydicom

    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientID = SECRET_NAME, SECRET_ID
        ds.save_as(p, enforce_file_format=True)


def enhanced_multiframe(path: Path, single_frame: list[Path]) -> Path:
    """A Legacy Converted Enhanced CT multi-frame (highdicom) built from a single-frame CT series."""
    import highdicom as hd
    import pydicom

    legacy = [pydicom.dcmread(p) for p in single_frame]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy,
        series_instance_uid=hd.UID(),
        series_number=7,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    mf.save_as(path, enforce_file_format=True)
    return path
