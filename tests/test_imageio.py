"""Scan reading: every supported mode, one-line errors for bad inputs, DICOM, NIfTI, input expansion."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from madclip_runtime.errors import InputError, MadclipError
from madclip_runtime.scans import scan
from madclip_runtime.scans.imageio import (
    MIN_SIDE,
    SCAN_EXTENSIONS,
    ScanImage,
    expand_inputs,
    read_image,
    read_mask,
    read_scans,
    window_to_unit,
)

REALSCANS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realscans"


def _raises_one_line(fn, path, *args, match: str | None = None, **kwargs) -> str:
    """Assert fn raises InputError whose single-line message names `path` (and contains `match`)."""
    with pytest.raises(InputError) as info:
        fn(path, *args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg and "\r" not in msg
    if match is not None:
        assert match in msg, msg
    return msg


def _grad(h: int = 20, w: int = 24) -> np.ndarray:
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 7 % 256).astype(np.uint8)  # [H, W]


# --------------------------------------------------------------------------------------- good PIL modes


def test_grey_png_is_uint8(tmp_path):
    a = _grad()
    p = tmp_path / "g.png"
    Image.fromarray(a).save(p)
    s = read_image(p)
    assert isinstance(s, ScanImage) and s.pixels.dtype == np.uint8 and s.pixels.shape == (20, 24)
    assert s.bits == 8 and s.source == str(p) and (s.height, s.width) == (20, 24)
    np.testing.assert_array_equal(s.pixels, a)


def test_rgb_rgba_palette_la(tmp_path):
    rgb = np.stack([_grad(), _grad()[::-1], np.full((20, 24), 9, np.uint8)], axis=2)  # [H, W, 3]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    s = read_image(tmp_path / "rgb.png")
    assert s.pixels.shape == (20, 24, 3) and s.pixels.dtype == np.uint8
    np.testing.assert_array_equal(s.pixels, rgb)

    rgba = np.concatenate(
        [rgb, np.full((20, 24, 1), 17, np.uint8)], axis=2
    )  # alpha must be dropped, not composited
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    s = read_image(tmp_path / "rgba.png")
    assert s.pixels.shape == (20, 24, 3)
    np.testing.assert_array_equal(s.pixels, rgb)

    pal = Image.fromarray(rgb).quantize(colors=16)
    pal.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    s = read_image(tmp_path / "pal.png")
    assert s.pixels.shape == (20, 24, 3) and s.pixels.dtype == np.uint8
    np.testing.assert_array_equal(s.pixels, np.asarray(pal.convert("RGB")))

    la = Image.merge("LA", [Image.fromarray(_grad()), Image.fromarray(np.zeros((20, 24), np.uint8))])
    la.save(tmp_path / "la.png")
    s = read_image(tmp_path / "la.png")
    assert s.pixels.shape == (20, 24) and s.pixels.dtype == np.uint8
    np.testing.assert_array_equal(s.pixels, _grad())


def test_jpeg_and_bmp(tmp_path):
    a = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))  # [16, 32]
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.stack([a] * 3, 2)).save(tmp_path / "c.jpeg", quality=95)
    Image.fromarray(a).save(tmp_path / "b.bmp")
    g = read_image(tmp_path / "a.jpg")
    assert g.pixels.shape == (16, 32) and g.pixels.dtype == np.uint8
    assert np.abs(g.pixels.astype(int) - a).max() < 12
    assert read_image(tmp_path / "c.jpeg").pixels.shape == (16, 32, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "b.bmp").pixels, a)


def test_16bit_png_windowing(tmp_path):
    a = np.zeros((10, 12), np.uint16)
    a[:, 6:] = 3000
    a[0, 0] = 1000
    p = tmp_path / "u16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode == "I;16"
    s = read_image(p)  # auto = per-image min/max
    assert s.bits == 16 and s.pixels.dtype == np.float32 and s.pixels.shape == (10, 12)
    assert s.pixels.min() == 0.0 and s.pixels.max() == 1.0
    assert s.pixels[0, 0] == pytest.approx(1000 / 3000)
    full = read_image(p, window="full").pixels  # divide by 65535
    assert full[0, 6] == pytest.approx(3000 / 65535) and full[1, 1] == 0.0
    np.testing.assert_allclose(read_image(p, window="minmax").pixels, s.pixels)


def test_mode_I_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="tifffile needed to write test TIFFs")
    a = np.arange(100, dtype=np.int32).reshape(10, 10) * 500  # [0, 49500]: fits 16 bits
    tifffile.imwrite(tmp_path / "i32.tif", a)
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    s = read_image(tmp_path / "i32.tif")
    assert s.bits == 16 and s.pixels.dtype == np.float32
    np.testing.assert_allclose(s.pixels, a / a.max(), atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "i32.tif", window="full").pixels, a / 65535, atol=1e-6)
    tifffile.imwrite(tmp_path / "big.tif", a * 1000)  # beyond 16 bits
    assert read_image(tmp_path / "big.tif").bits == 32


def test_16bit_tiff_and_float_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="tifffile needed to write test TIFFs")
    u16 = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", u16)
    s = read_image(tmp_path / "u16.tif")
    assert s.bits == 16 and s.pixels.dtype == np.float32
    np.testing.assert_allclose(s.pixels, u16 / u16.max(), atol=1e-6)

    f = np.linspace(-2.0, 3.0, 100, dtype=np.float32).reshape(10, 10)
    tifffile.imwrite(tmp_path / "f.tiff", f)
    s = read_image(tmp_path / "f.tiff")
    assert s.bits == 32 and s.pixels.dtype == np.float32 and s.pixels.shape == (10, 10)
    np.testing.assert_allclose(s.pixels, (f + 2.0) / 5.0, atol=1e-6)
    full = read_image(tmp_path / "f.tiff", window="full").pixels  # float: already in [0, 1], clipped
    np.testing.assert_allclose(full, np.clip(f, 0, 1), atol=1e-7)


def test_window_to_unit():
    v = np.array([[2.0, 4.0], [6.0, 10.0]])
    np.testing.assert_allclose(window_to_unit(v, "minmax"), [[0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(window_to_unit(v, "full", 20.0), [[0.1, 0.2], [0.3, 0.5]])
    assert not window_to_unit(np.full((3, 3), 5.0), "minmax").any()  # constant -> zeros, no division by zero
    with pytest.raises(ValueError):
        read_image("whatever.png", window="bogus")


def test_read_mask(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.float32 and out.shape == (16, 16)
    np.testing.assert_array_equal(out, m / 255.0)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[2:5, 2:5, 1] = 255
    Image.fromarray(rgb).save(tmp_path / "rgbm.png")
    assert read_mask(tmp_path / "rgbm.png").sum() == 9.0


# --------------------------------------------------------------------------------------- bad inputs


def test_missing_directory_empty(tmp_path):
    _raises_one_line(read_image, tmp_path / "nope.png", match="no such file")
    _raises_one_line(read_image, tmp_path, match="directory")
    (tmp_path / "empty.png").write_bytes(b"")
    _raises_one_line(read_image, tmp_path / "empty.png", match="empty")
    _raises_one_line(read_scans, tmp_path / "nope.dcm", match="no such file")


def test_truncated_png(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing madclip_runtime must not enable it
    rng = np.random.default_rng(0)
    p = tmp_path / "trunc.png"
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    _raises_one_line(read_image, p, match="corrupt")


def test_text_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("these are\nnot pixels\n")
    _raises_one_line(read_image, p, match="not an image")


@pytest.mark.parametrize("size", [(1, 1), (7, 50), (50, 7)])
def test_too_small(tmp_path, size):
    p = tmp_path / "tiny.png"
    Image.new("L", size).save(p)
    _raises_one_line(read_image, p, match=f"at least {MIN_SIDE}")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _bomb_png(path: Path, width: int = 50000, height: int = 50000) -> None:
    """A tiny PNG whose IHDR claims width x height 8-bit grey pixels, with a one-row IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one filtered row; decoding would need far more
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    _bomb_png(p)
    assert p.stat().st_size < 1000
    t0 = time.perf_counter()
    _raises_one_line(
        read_image, p, match="refusing to decode"
    )  # PIL's bomb error (or ours), as an InputError
    # with PIL's limit switched off, our header check must still refuse before decoding
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    _raises_one_line(read_image, p, match="over the limit")
    assert decoded == []
    assert time.perf_counter() - t0 < 2.0


def test_our_pixel_limit_and_pil_bomb_warning(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(p)
    monkeypatch.setattr(scan, "MAX_PIXELS", 5000)  # the limit lives in madclip_runtime.scans.scan
    _raises_one_line(read_image, p, match="over the limit of 5000")
    monkeypatch.setattr(scan, "MAX_PIXELS", 100_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 px: PIL warns (between 1x and 2x its limit)
    _raises_one_line(read_image, p, match="too large")


def test_nan_float_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="tifffile needed to write test TIFFs")
    f = np.ones((10, 10), np.float32)
    f[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", f)
    _raises_one_line(read_image, tmp_path / "nan.tif", match="NaN")
    f[3, 3] = np.inf
    tifffile.imwrite(tmp_path / "inf.tif", f)
    _raises_one_line(read_image, tmp_path / "inf.tif", match="infinite")


def test_unsupported_mode(tmp_path):
    p = tmp_path / "lab.tif"
    Image.new("LAB", (10, 10)).save(p)
    assert Image.open(p).mode == "LAB"
    _raises_one_line(read_image, p, match="unsupported image mode 'LAB'")


def test_2d_image_has_only_slice_0(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(_grad()).save(p)
    assert len(read_scans(p)) == 1 and read_scans(p, slice_index=0)[0].source == str(p)
    _raises_one_line(read_scans, p, slice_index=2, match="only slice 0")


# --------------------------------------------------------------------------------------- DICOM


def _write_dicom(path: Path, stored: np.ndarray, **attrs) -> Path:
    """Write a minimal CT DICOM: `stored` is [R, C] or [F, R, C]; attrs are extra elements."""
    pydicom = pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if stored.dtype == np.float32:
        ds.BitsAllocated = 32
        ds.FloatPixelData = stored.tobytes()
    else:
        ds.BitsAllocated = stored.dtype.itemsize * 8
        ds.BitsStored = ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(stored.dtype.kind == "i")
        ds.PixelData = stored.tobytes()
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(str(path), enforce_file_format=True)
    assert pydicom is not None
    return path


def test_dicom_rescale_and_window(tmp_path):
    stored = np.arange(-100, 300, dtype=np.int16).reshape(20, 20)  # [20, 20]
    p = _write_dicom(
        tmp_path / "ct.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=[-600, 40],
        WindowWidth=[397, 80],
        BitsStored=12,
    )
    (s,) = read_scans(p)  # auto: first window, LINEAR
    assert s.pixels.dtype == np.float32 and s.pixels.shape == (20, 20) and s.bits == 12 and s.source == str(p)
    hu = stored.astype(np.float64) * 2 - 1000
    expected = np.clip((hu - (-600 - 0.5)) / 396 + 0.5, 0, 1)
    np.testing.assert_allclose(s.pixels, expected, atol=1e-6)
    assert (
        s.pixels.min() == 0.0 and s.pixels.max() == 1.0
    )  # window [-798.5, -402.5] inside HU range [-1200, -402]

    mm = read_scans(p, window="minmax")[0].pixels  # rescale is linear: min/max of HU == min/max of stored
    np.testing.assert_allclose(mm, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    full = read_scans(p, window="full")[0].pixels  # 12-bit signed stored range [-2048, 2047] after rescale
    np.testing.assert_allclose(full, (hu - (-2048 * 2 - 1000)) / (4095 * 2), atol=1e-6)


def test_dicom_voi_functions_and_voi_lut_sequence(tmp_path):
    """Window functions and a VOI LUT Sequence (mammography/CR) go through pydicom's apply_voi_lut."""
    pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = np.arange(400, dtype=np.uint16).reshape(20, 20)  # [20, 20]
    x = stored.astype(np.float64)
    for function, expected in (
        ("LINEAR", np.clip((x - 39.5) / 79 + 0.5, 0, 1)),
        ("LINEAR_EXACT", np.clip((x - 40) / 80 + 0.5, 0, 1)),
        ("SIGMOID", 1 / (1 + np.exp(-4 * (x - 40) / 80))),
    ):
        p = _write_dicom(
            tmp_path / f"{function}.dcm",
            stored,
            WindowCenter=40,
            WindowWidth=80,
            VOILUTFunction=function,
            BitsStored=12,
        )
        np.testing.assert_allclose(read_scans(p)[0].pixels, expected, atol=1e-4, err_msg=function)

    lut = Dataset()  # 4 entries from stored value 100, 16-bit output: a step curve no window describes
    lut.LUTDescriptor = [4, 100, 16]
    lut.LUTData = np.array([0, 1000, 30000, 65535], "<u2").tobytes()  # written as raw 16-bit words
    p = _write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=Sequence([lut]))
    px = read_scans(p)[0].pixels
    expected = np.take(np.array([0, 1000, 30000, 65535]) / 65535.0, np.clip(stored.astype(int) - 100, 0, 3))
    np.testing.assert_allclose(px, expected, atol=1e-6)  # not min/max: the LUT is applied


def test_dicom_monochrome1_and_uint8(tmp_path):
    stored = np.arange(400, dtype=np.uint16).reshape(20, 20) * 10  # [20, 20] in [0, 3990]
    p = _write_dicom(
        tmp_path / "m1.dcm",
        stored,
        PhotometricInterpretation="MONOCHROME1",
        WindowCenter=2000,
        WindowWidth=2001,
    )
    s = read_scans(p)[0]
    expected = 1.0 - np.clip((stored - 1999.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(s.pixels, expected, atol=1e-6)
    assert s.pixels[0, 0] == 1.0 and s.pixels[-1, -1] == 0.0  # low stored value is bright for MONOCHROME1

    u8 = _grad()
    (g,) = read_scans(_write_dicom(tmp_path / "u8.dcm", u8))
    assert g.pixels.dtype == np.uint8 and g.bits == 8
    np.testing.assert_array_equal(g.pixels, u8)
    (g1,) = read_scans(_write_dicom(tmp_path / "u8m1.dcm", u8, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(g1.pixels, 255 - u8)
    (gr,) = read_scans(_write_dicom(tmp_path / "u8r.dcm", u8, RescaleSlope=2, RescaleIntercept=0))
    assert gr.pixels.dtype == np.float32  # a rescale makes it a windowed float image


def test_dicom_multiframe_and_extensionless(tmp_path):
    stored = np.stack([np.full((10, 10), v, np.uint16) for v in (0, 100, 200)])  # [3, 10, 10]
    stored[:, 0, 0] = 1000
    stored[:, 0, 1] = 0
    p = _write_dicom(tmp_path / "IM0001", stored)  # no extension: found by the DICM magic
    scans = read_scans(p)
    assert [s.source for s in scans] == [f"{p}#slice={i}" for i in range(3)]
    assert all(s.pixels.shape == (10, 10) and s.pixels.dtype == np.float32 for s in scans)
    assert scans[1].pixels[5, 5] == pytest.approx(100 / 1000) and scans[2].pixels[5, 5] == pytest.approx(
        0.2
    )  # per-slice min/max
    (one,) = read_scans(p, slice_index=2)
    np.testing.assert_array_equal(one.pixels, scans[2].pixels)
    assert one.source == f"{p}#slice=2"
    _raises_one_line(read_scans, p, slice_index=3, match="out of range")


def test_dicom_rgb_and_enhanced_functional_groups(tmp_path):
    pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    rgb = np.stack([_grad(), _grad()[::-1], np.full((20, 24), 5, np.uint8)], axis=2)  # [R, C, 3]
    p = _write_dicom(
        tmp_path / "rgb.dcm",
        _grad(),
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        PixelData=rgb.tobytes(),
    )
    (s,) = read_scans(p)
    assert s.pixels.dtype == np.uint8 and s.pixels.shape == (20, 24, 3)
    np.testing.assert_array_equal(s.pixels, rgb)

    # enhanced multi-frame: rescale shared by all frames, a VOI window per frame
    stored = np.stack([np.arange(100, dtype=np.uint16).reshape(10, 10)] * 2)  # [2, 10, 10]
    shared, pvt = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept = 2, -10
    shared.PixelValueTransformationSequence = Sequence([pvt])
    per_frame = []
    for center, width in ((40, 41), (100, 101)):
        item, voi = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        item.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(item)
    p = _write_dicom(
        tmp_path / "enh.dcm",
        stored,
        SharedFunctionalGroupsSequence=Sequence([shared]),
        PerFrameFunctionalGroupsSequence=Sequence(per_frame),
    )
    values = stored[0].astype(np.float64) * 2 - 10
    for s, (center, width) in zip(read_scans(p), ((40, 41), (100, 101))):
        np.testing.assert_allclose(
            s.pixels, np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1), atol=1e-6
        )


def test_dicom_bad_inputs(tmp_path):
    pytest.importorskip("pydicom", reason="pydicom (madclip[medical]) not installed")
    f = np.ones((10, 10), np.float32)
    f[2, 2] = np.nan
    _raises_one_line(read_scans, _write_dicom(tmp_path / "nan.dcm", f), match="NaN")
    (tmp_path / "text.dcm").write_text("hello\nworld\n" * 10)
    _raises_one_line(read_scans, tmp_path / "text.dcm", match="DICOM")
    nopix = _write_dicom(tmp_path / "nopix.dcm", _grad())
    import pydicom

    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(str(nopix))
    _raises_one_line(read_scans, nopix, match="no pixel data")
    _raises_one_line(
        read_scans, _write_dicom(tmp_path / "tiny.dcm", np.zeros((4, 4), np.uint8)), match="at least"
    )


def test_missing_medical_dependency_is_one_line(tmp_path, monkeypatch):
    import importlib

    real_import_module = importlib.import_module

    def fake_import_module(name, package=None):
        if name.split(".")[0] in ("pydicom", "nibabel"):
            raise ImportError(f"No module named {name!r}")
        return real_import_module(name, package)

    monkeypatch.setattr(importlib, "import_module", fake_import_module)
    for name in ("scan.dcm", "vol.nii.gz"):
        p = tmp_path / name
        p.write_bytes(b"\0" * 200)
        with pytest.raises(MadclipError) as info:
            read_scans(p)
        msg = str(info.value)
        assert str(p) in msg and 'pip install "madclip[medical]"' in msg and "\n" not in msg


# --------------------------------------------------------------------------------------- NIfTI


def _write_nifti(path: Path, vol: np.ndarray, affine: np.ndarray | None = None, **header) -> Path:
    nib = pytest.importorskip("nibabel", reason="nibabel (madclip[medical]) not installed")
    img = nib.Nifti1Image(vol, np.eye(4) if affine is None else affine)
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, str(path))
    return path


def test_nifti_slices_orientation_and_selection(tmp_path):
    vol = np.arange(10 * 12 * 4, dtype=np.int16).reshape(10, 12, 4)  # [X, Y, Z], RAS affine
    p = _write_nifti(tmp_path / "v.nii.gz", vol)
    scans = read_scans(p)
    assert len(scans) == 4 and [s.source for s in scans] == [f"{p}#slice={k}" for k in range(4)]
    for k, s in enumerate(scans):
        assert s.pixels.shape == (12, 10) and s.pixels.dtype == np.float32 and s.bits == 16
        plane = vol[::-1, ::-1, k].T.astype(np.float64)  # rows anterior->posterior, cols right->left
        np.testing.assert_allclose(s.pixels, (plane - plane.min()) / (plane.max() - plane.min()), atol=1e-6)
    (one,) = read_scans(p, slice_index=2)
    np.testing.assert_array_equal(one.pixels, scans[2].pixels)
    assert one.source == f"{p}#slice=2"
    _raises_one_line(read_scans, p, slice_index=4, match="out of range")

    # stored superior->inferior (z flipped in the affine): slices still come out inferior->superior
    flipped = _write_nifti(tmp_path / "flip.nii", vol[:, :, ::-1].copy(), np.diag([1.0, 1.0, -1.0, 1.0]))
    for a, b in zip(read_scans(flipped), scans):
        np.testing.assert_array_equal(a.pixels, b.pixels)


def test_nifti_uint8_scaling_and_cal_window(tmp_path):
    u8 = np.random.default_rng(1).integers(0, 256, (16, 16, 2), dtype=np.uint8)
    (s0, _) = read_scans(_write_nifti(tmp_path / "u8.nii", u8))
    assert s0.pixels.dtype == np.uint8
    np.testing.assert_array_equal(s0.pixels, u8[::-1, ::-1, 0].T)

    vol = np.arange(16 * 16 * 2, dtype=np.int16).reshape(16, 16, 2)
    p = _write_nifti(tmp_path / "cal.nii", vol, cal_min=100, cal_max=300)
    s = read_scans(p, slice_index=0)[0]
    np.testing.assert_allclose(s.pixels, np.clip((vol[::-1, ::-1, 0].T - 100) / 200.0, 0, 1), atol=1e-6)
    full = read_scans(p, slice_index=0, window="full")[0].pixels  # int16 range -> [0, 1]
    np.testing.assert_allclose(full, (vol[::-1, ::-1, 0].T.astype(np.float64) + 32768) / 65535.0, atol=1e-6)


def test_nifti_2d_image(tmp_path):
    plane = np.arange(12 * 9, dtype=np.float32).reshape(12, 9)  # [X, Y]
    (s,) = read_scans(_write_nifti(tmp_path / "p.nii", plane))
    assert s.pixels.shape == (9, 12) and s.source == str(tmp_path / "p.nii")
    np.testing.assert_allclose(s.pixels, plane[::-1, ::-1].T / plane.max(), atol=1e-6)


def test_nifti_bad_inputs(tmp_path):
    pytest.importorskip("nibabel", reason="nibabel (madclip[medical]) not installed")
    f = np.ones((10, 10, 3), np.float32)
    f[1, 1, 1] = (
        np.nan
    )  # resampled data: NaN is background (the lowest finite value), not a refusal (issue 19)
    assert all(np.isfinite(s.pixels).all() for s in read_scans(_write_nifti(tmp_path / "nan.nii.gz", f)))
    _raises_one_line(
        read_scans,
        _write_nifti(tmp_path / "allnan.nii.gz", np.full((10, 10, 3), np.nan, np.float32)),
        match="NaN",
    )
    (tmp_path / "junk.nii").write_text("not a volume\n" * 40)
    _raises_one_line(read_scans, tmp_path / "junk.nii", match="NIfTI")
    _raises_one_line(
        read_scans,
        _write_nifti(tmp_path / "v4.nii", np.zeros((10, 10, 3, 2), np.int16)),
        match="--volume-index",
    )
    good = _write_nifti(tmp_path / "trunc.nii.gz", np.arange(4000, dtype=np.int16).reshape(20, 20, 10))
    good.write_bytes(good.read_bytes()[:200])
    _raises_one_line(read_scans, good)


# --------------------------------------------------------------------------------------- expand_inputs


def test_expand_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.PNG", "c.nii.gz", "notes.txt", "sub/d.dcm"):
        (tmp_path / name).write_bytes(b"x")
    dicom_like = tmp_path / "IM0002"
    dicom_like.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    (tmp_path / "README").write_text("no")
    files = expand_inputs([str(tmp_path)])
    assert files == sorted(str(tmp_path / n) for n in ("IM0002", "a.PNG", "b.png", "c.nii.gz"))
    rec = expand_inputs([str(tmp_path)], recursive=True)
    assert str(tmp_path / "sub" / "d.dcm") in rec and len(rec) == 5
    # files kept as given (even unsupported ones), globs expanded to scans, duplicates dropped, order kept
    got = expand_inputs([str(tmp_path / "notes.txt"), str(tmp_path / "*.png"), str(tmp_path / "b.png")])
    assert got == [str(tmp_path / "notes.txt"), str(tmp_path / "b.png")]
    assert expand_inputs([str(tmp_path / "**" / "*.dcm")], recursive=True) == [
        str(tmp_path / "sub" / "d.dcm")
    ]
    assert set(SCAN_EXTENSIONS) >= {".png", ".dcm", ".nii", ".nii.gz"}


def test_expand_inputs_errors(tmp_path):
    def expand_one(item):
        return expand_inputs([str(item)])

    _raises_one_line(expand_one, tmp_path / "*.dcm", match="no files match")
    (tmp_path / "a.txt").write_text("x")
    _raises_one_line(expand_one, tmp_path / "*.txt", match="none is a scan")
    _raises_one_line(expand_one, tmp_path, match="no scan files")
    _raises_one_line(expand_one, tmp_path / "missing.png", match="no such file")


# --------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_scans_read():
    if not REALSCANS.is_dir():
        pytest.skip(f"real scans not present at {REALSCANS}")
    raw16 = expand_inputs([str(REALSCANS / "raw16" / "*.png")])
    assert len(raw16) >= 1
    for p in raw16:
        (s,) = read_scans(p)
        assert s.bits == 16 and s.pixels.dtype == np.float32 and s.pixels.ndim == 2
        assert s.pixels.min() == 0.0 and s.pixels.max() == 1.0 and min(s.height, s.width) >= MIN_SIDE
    brain = expand_inputs([str(REALSCANS / "Brain_AD")], recursive=True)
    imgs = [p for p in brain if "/img/" in p]
    masks = [p for p in brain if "/anomaly_mask/" in p]
    assert imgs and masks
    for p in imgs:
        s = read_image(p)
        assert s.pixels.dtype == np.uint8 and s.pixels.ndim in (2, 3)
    for p in masks:
        m = read_mask(p)
        assert m.dtype == np.float32 and m.ndim == 2 and 0.0 <= m.min() and m.max() <= 1.0 and m.max() > 0


def test_read_mask_keeps_0_1_label_masks(tmp_path):
    from madclip_runtime.scans.imageio import read_mask

    labels = np.zeros((20, 20), np.uint8)
    labels[5:10, 5:10] = 1
    Image.fromarray(labels).save(tmp_path / "m01.png")
    Image.fromarray(labels * 255).save(tmp_path / "m255.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m01.png"), labels.astype(np.float32))
    np.testing.assert_array_equal(read_mask(tmp_path / "m255.png"), labels.astype(np.float32))
