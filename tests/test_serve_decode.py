"""Serving pieces that need no Ray: request bytes -> scans, map encoding, CLI option parsing, missing Ray."""

from __future__ import annotations

import io
import socket
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.errors import InputError, MadclipError
from madclip_runtime.scans.imageio import read_scans
from madclip_runtime.serve import require_ray
from madclip_runtime.serve.decode import decode_scan_bytes, sniff_suffix
from madclip_runtime.serve.maps import decode_map, encode_map

from .conftest import realscans_or_skip, write_multiframe_dicom


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A small valid PNG whose header claims width x height pixels (1.6 G by default)."""
    data = bytearray(png_bytes(np.zeros((16, 16), np.uint8)))
    ihdr = bytearray(data[16:29])  # IHDR payload: width, height, depth, colour, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_bytes_decode_like_the_file(tmp_path):
    """A real 16-bit scan sent as bytes gives the very pixels the file reader gives, named after the client."""
    src = realscans_or_skip("raw16") / "brain1_z00_u16.png"
    [from_file] = read_scans(src)
    [from_bytes] = decode_scan_bytes(src.read_bytes(), name="scans/brain1_z00_u16.png")
    assert from_bytes.source == "scans/brain1_z00_u16.png"
    assert from_bytes.bits == from_file.bits == 16
    assert from_bytes.pixels.dtype == from_file.pixels.dtype
    np.testing.assert_array_equal(from_bytes.pixels, from_file.pixels)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp")])
def test_format_sniffed_without_a_name(fmt, suffix):
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24), 77, np.uint8)).save(buf, format=fmt)
    assert sniff_suffix(buf.getvalue()) == suffix
    [scan] = decode_scan_bytes(buf.getvalue())
    assert scan.pixels.shape == (20, 24) and scan.source == "<request>"


def test_bad_bodies_are_one_line_input_errors(tmp_path):
    good = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    cases = {
        "empty": (b"", "empty request body"),
        "garbage": (b"hello, not an image", "not a recognised scan format"),
        "truncated": (good[: len(good) // 2], "truncated or corrupt"),
        "bomb": (bomb_png(), "decompression bomb"),
        "oversized": (good, "over the limit of 100 bytes"),
    }
    for label, (body, expected) in cases.items():
        with pytest.raises(InputError) as info:
            decode_scan_bytes(
                body,
                name=f"{label}.png" if label != "garbage" else "x",
                max_bytes=100 if label == "oversized" else 1 << 20,
                tmp_dir=str(tmp_path),
            )
        msg = str(info.value)
        assert expected in msg and "\n" not in msg, (label, msg)
        assert "madclip-req-" not in msg, f"{label}: the temporary file name leaked: {msg}"
    assert list(tmp_path.iterdir()) == [], "temporary request files were left behind"


def test_map_encoding_round_trip():
    rng = np.random.default_rng(0)
    amap = rng.uniform(0, 4, (37, 53)).astype(np.float32)
    np.testing.assert_array_equal(decode_map(encode_map(amap, "npy", (0.0, 4.0))), amap)
    png = decode_map(encode_map(amap, "png16", (0.0, 4.0)))
    assert png.shape == amap.shape
    assert np.max(np.abs(png - amap)) <= 4.0 / 65535  # one 16-bit step on the fixed scale


def test_missing_ray_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.serve", None)  # import of ray.serve now raises ImportError
    with pytest.raises(MadclipError, match=r"ray\[serve\] is not installed.*pip install 'madclip\[serve\]'"):
        require_ray("serve")


def test_serve_cli_options_and_bad_bundle(tmp_path, capsys):
    from madclip_runtime.serve.cli import deployment_error, main, parse_autoscale

    assert parse_autoscale("1:4", 8) == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    with pytest.raises(MadclipError):
        parse_autoscale("4:1", 8)
    msg = deployment_error(
        RuntimeError(
            "Traceback ...\n  File x\nmadclip_runtime.errors.BundleError: /b: "
            "tampered or corrupt: model.onnx sha256 mismatch\n"
        )
    )
    assert msg == "/b: tampered or corrupt: model.onnx sha256 mismatch"
    assert main(["--bundle", str(tmp_path / "nope")]) == 2  # before any Ray starts
    err = capsys.readouterr().err
    assert "no such bundle directory" in err and "Traceback" not in err


def test_batch_cli_bad_bundle_exits_2(tmp_path, capsys):
    from madclip_runtime.serve.batch import main

    scan = tmp_path / "a.png"
    scan.write_bytes(png_bytes(np.zeros((32, 32), np.uint8)))
    assert main([str(scan), "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no such bundle directory" in err and "Traceback" not in err


def test_multiframe_dicom_bytes_sniffed(tmp_path):
    """DICOM bytes with no file name: found by the DICM magic, one slice per frame, named after the request."""
    frames = np.random.default_rng(1).integers(0, 4000, (3, 40, 48)).astype(np.uint16)  # [F, R, C]
    path = write_multiframe_dicom(tmp_path / "ct.dcm", frames)
    from_file = read_scans(path)
    from_bytes = decode_scan_bytes(path.read_bytes())
    assert [s.source for s in from_bytes] == [f"<request>#slice={i}" for i in range(3)]
    for a, b in zip(from_file, from_bytes):
        np.testing.assert_array_equal(a.pixels, b.pixels)
    [one] = decode_scan_bytes(path.read_bytes(), name="ct.dcm", slice_index=2)
    assert one.source == "ct.dcm#slice=2"


def test_config_file_app_builder():
    """The import path a Serve config / KubeRay RayService uses builds the app from plain args."""
    pytest.importorskip("ray.serve", reason="ray[serve] (madclip[serve]) not installed")
    from madclip_runtime.serve.app import app_builder

    app = app_builder({"bundle": "/bundles/b", "backend": "ort-cpu", "max_body_mb": "2", "threshold": "1.5"})
    cfg = app._bound_deployment.init_args[0]
    assert (cfg.bundle, cfg.backend, cfg.max_body_bytes, cfg.threshold) == (
        "/bundles/b",
        "ort-cpu",
        2 * 2**20,
        1.5,
    )
    with pytest.raises(MadclipError, match="args.bundle"):
        app_builder({})


def test_serving_modules_never_import_torch():
    """The serving sub-package is runtime-side: importing all of it (Ray included) loads no torch."""
    import subprocess

    pytest.importorskip("ray.serve", reason="ray[serve] (madclip[serve]) not installed")
    code = (
        "import sys\n"
        "import madclip_runtime.serve.app, madclip_runtime.serve.batch, madclip_runtime.serve.cli\n"
        "import madclip_runtime.serve.client\n"
        "bad = [m for m in ('torch', 'open_clip', 'madclip_train', 'madclip_export') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_infer_server_unreachable_is_one_line(tmp_path, capsys):
    from madclip_runtime.cli.infer import main

    scan = tmp_path / "a.png"
    scan.write_bytes(png_bytes(np.zeros((32, 32), np.uint8)))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main([str(scan), "--server", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the madclip server" in err and "Traceback" not in err
    assert main([str(scan)]) == 2 and "--bundle is required" in capsys.readouterr().err


def test_deployment_options_reach_serve():
    """Replica resources, batching switch and autoscaling land in the Serve deployment as configured."""
    pytest.importorskip("ray.serve", reason="ray[serve] (madclip[serve]) not installed")
    from madclip_runtime.serve.app import build_app
    from madclip_runtime.serve.replica import ServeConfig

    fixed = build_app(
        ServeConfig(bundle="/b"), replicas=3, num_cpus=2, num_gpus=0.5, max_batch_size=1, batch_wait_s=0.0
    )._bound_deployment
    assert fixed.num_replicas == 3 and fixed.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.5}
    assert fixed.user_config == {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    auto = build_app(
        ServeConfig(bundle="/b"),
        autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
    )._bound_deployment
    scaling = auto._deployment_config.autoscaling_config  # no public getter in Ray 2.60
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8.0)
