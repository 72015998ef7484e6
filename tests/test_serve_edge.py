"""The serving edge without Ray (issue 20 / 22): upload limits, wire validation shared with the CLI and the
API, numeric options refused before Ray starts, port in use, trusted key on serve/batch/client, actor counts,
per-input errors, one golden check and one model call.
"""

from __future__ import annotations

import ast
import asyncio
import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from madclip_runtime.errors import BundleError, InputError, MadclipError
from madclip_runtime.serve import limits
from madclip_runtime.serve.limits import RequestError, UploadGate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("cryptography")
    from madclip_runtime.bundles.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    for name in ("lab", "other"):
        generate_keypair(d / f"{name}.key", d / f"{name}.pub")
    return d


def _signed_copy(standin: Path, dst: Path, key: Path | None) -> Path:
    from madclip_runtime.bundles.bundle import write_metadata
    from madclip_runtime.bundles.signing import load_private_key

    shutil.copytree(standin, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    write_metadata(dst, meta, signing_key=load_private_key(key) if key else None)
    return dst


# ------------------------------------------------------------------------------------------ upload limits


async def _trickle(n: int, every_s: float, size: int = 1):
    for _ in range(n):
        await asyncio.sleep(every_s)
        yield b"x" * size


async def _at_once(data: bytes):
    yield data


def _gate_timings(monkeypatch, **seconds: float) -> None:
    """Shorten the upload gate's timings (FAST_S, GRACE_S, WAIT_S, TICK_S of serve.limits) for one test."""
    for name, value in seconds.items():
        monkeypatch.setattr(limits, name, value)


def test_upload_gate_reads_a_normal_body_and_refuses_oversize():
    gate = UploadGate(max_uploads=2)
    assert asyncio.run(gate.read(_at_once(b"abc"), limit=10)) == b"abc"
    with pytest.raises(RequestError) as e:
        asyncio.run(gate.read(_at_once(b"abc"), limit=10, declared="11"))
    assert e.value.status == 413
    with pytest.raises(RequestError) as e:
        asyncio.run(gate.read(_at_once(b"x" * 11), limit=10))
    assert e.value.status == 413 and not gate.active


def test_upload_gate_drops_a_trickling_body_and_a_stalled_one(monkeypatch):
    _gate_timings(monkeypatch, FAST_S=0.1, GRACE_S=0.3, TICK_S=0.05)
    gate = UploadGate(max_uploads=4, body_timeout_s=0.4, min_rate=100)
    t0 = time.monotonic()
    with pytest.raises(RequestError) as e:  # one byte every 0.1 s: 10 B/s, under 100 B/s
        asyncio.run(gate.read(_trickle(100, 0.1), limit=1000))
    assert e.value.status == 408 and "bytes/s" in str(e.value) and time.monotonic() - t0 < 3
    gate = UploadGate(max_uploads=4, body_timeout_s=0.4, min_rate=0)
    with pytest.raises(RequestError) as e:  # no chunk for 5 s
        asyncio.run(gate.read(_trickle(1, 5.0), limit=1000))
    assert e.value.status == 408 and "no request body data" in str(e.value)
    assert not gate.active and time.monotonic() - t0 < 6


def test_upload_gate_full_of_slow_uploads_still_takes_a_good_request(monkeypatch):
    """Bodies that arrive at once need no upload slot; slow ones share the slots, the slowest is evicted."""
    _gate_timings(monkeypatch, FAST_S=0.05, GRACE_S=0.5, WAIT_S=0.1, TICK_S=0.02)

    async def scenario():
        gate = UploadGate(max_uploads=3, body_timeout_s=30, min_rate=0)
        slow = [asyncio.ensure_future(gate.read(_trickle(20, 0.05 * (1 + i)), limit=10**6)) for i in range(3)]
        await asyncio.sleep(0.15)
        full = len(gate.active)
        t0 = time.monotonic()
        good = await gate.read(_at_once(b"good"), limit=100)  # all slots taken: needs none
        took = time.monotonic() - t0
        busy = None
        try:  # another slow one: every slot is younger than the grace period: it waits WAIT_S, then 503
            await gate.read(_trickle(20, 0.05), limit=10**6)
        except RequestError as exc:
            busy = exc
        await asyncio.sleep(0.5)  # now the three are past their grace
        fourth = await gate.read(_trickle(6, 0.03), limit=10**6)  # takes the slowest's slot
        results = await asyncio.gather(*slow, return_exceptions=True)
        return full, good, took, busy, fourth, results, gate

    full, good, took, busy, fourth, results, gate = asyncio.run(scenario())
    assert full == 3 and good == b"good" and took < 0.2
    assert busy is not None and busy.status == 503 and busy.headers.get("Retry-After")
    assert fourth == b"x" * 6
    assert results[0] == b"x" * 20 and results[1] == b"x" * 20  # the faster two finished their bodies
    assert (
        isinstance(results[2], RequestError)
        and results[2].status == 408
        and "slots were needed" in str(results[2])
    )
    assert gate.stats["evicted"] == 1 and gate.stats["waited"] >= 1 and not gate.active


def test_upload_gate_slow_body_waits_unread_for_a_slot(monkeypatch):
    """A slow body finding every slot taken waits (not read) and gets the first slot that frees up."""
    _gate_timings(monkeypatch, FAST_S=0.05, GRACE_S=5.0, WAIT_S=3.0, TICK_S=0.02)

    async def scenario():
        gate = UploadGate(max_uploads=1, body_timeout_s=30, min_rate=0)
        first = asyncio.ensure_future(gate.read(_trickle(10, 0.05), limit=100))  # holds the slot ~0.5 s
        await asyncio.sleep(0.1)
        second = await gate.read(_trickle(3, 0.05), limit=100)  # waits, then reads
        return await first, second, gate

    first, second, gate = asyncio.run(scenario())
    assert first == b"x" * 10 and second == b"x" * 3 and gate.stats["waited"] == 1 and not gate.active


# ------------------------------------------------------------------------------------------ wire = CLI = API


def test_wire_threshold_validated_like_the_api(standin):
    import madclip_runtime as mr
    from madclip_runtime.bundles.bundle import load_bundle
    from madclip_runtime.serve.replica import wire_options

    b = load_bundle(standin, verify="none")
    with pytest.raises(InputError) as api:
        mr.load(standin, threshold=-5)
    with pytest.raises(InputError) as wire:
        wire_options({"threshold": "-5"}, b)
    assert str(wire.value) == str(api.value) and "outside" in str(wire.value)
    for bad in ("nan", "inf", "9", "x"):
        with pytest.raises(InputError):
            wire_options({"threshold": bad}, b)
    for key, bad in (("slice", "-1"), ("slice", "1.5"), ("map", "gif")):
        with pytest.raises(InputError):
            wire_options({key: bad}, b)
    ok = wire_options({"threshold": "1.5", "slice": "2", "map": "npy", "name": "a.png"}, b)
    assert (ok.threshold, ok.slice_index, ok.map_format, ok.name) == (1.5, 2, "npy", "a.png")


# ------------------------------------------------------------------------------------------ options before Ray


@pytest.fixture()
def no_ray(monkeypatch):
    """Any attempt to start Ray fails the test: the refusals must come first."""
    from madclip_runtime.serve import cli

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "start_ray", refuse)


def _one_line(capsys, main, argv: list[str]) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's refusal (one line, exit 2)
        rc = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "\x1b[" not in err and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "option,value",
    [
        ("--max-body-mb", "nan"),
        ("--max-body-mb", "inf"),
        ("--max-body-mb", "0"),
        ("--graceful-timeout", "nan"),
        ("--max-ongoing", "0"),
        ("--batch-wait-ms", "-5"),
        ("--threshold", "nan"),
        ("--threshold", "9"),
        ("--port", "0"),
        ("--replicas", "0"),
        ("--num-cpus", "nan"),
        ("--max-uploads", "0"),
        ("--body-timeout", "0"),
        ("--min-upload-rate", "-1"),
        ("--target-ongoing", "inf"),
        ("--max-batch", "0"),
        ("--keep-alive", "nan"),
    ],
)
def test_serve_numeric_options_refused_before_ray(standin, no_ray, capsys, option, value):
    from madclip_runtime.serve.cli import main

    line = _one_line(capsys, main, ["--bundle", str(standin), option, value])
    assert option.lstrip("-") in line or "threshold" in line


@pytest.mark.parametrize(
    "option,value",
    [
        ("--cpus-per-actor", "nan"),
        ("--threshold", "nan"),
        ("--threshold", "9"),
        ("--actors", "0"),
        ("--gpus-per-actor", "-1"),
        ("--slice", "-1"),
        ("--ray-num-cpus", "0"),
    ],
)
def test_batch_numeric_options_refused_before_ray(standin, no_ray, tmp_path, capsys, option, value):
    from madclip_runtime.serve.batch import main

    (tmp_path / "a.png").write_bytes(b"")
    _one_line(
        capsys,
        main,
        [str(tmp_path / "a.png"), "--bundle", str(standin), "--out", str(tmp_path / "o"), option, value],
    )


def test_serve_port_in_use_is_one_line(standin, no_ray, capsys):
    from madclip_runtime.serve.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        line = _one_line(capsys, main, ["--bundle", str(standin), "--port", str(port)])
    assert f"port {port}" in line and "in use" in line


def test_ansi_codes_stripped_from_ray_errors():
    from madclip_runtime.serve.cli import deployment_error

    text = (
        "\x1b[36mray::ProxyActor.ready()\x1b[39m (pid=1)\nRuntimeError: \x1b[31maddress already in use\x1b[0m"
    )
    assert deployment_error(RuntimeError(text)) == "RuntimeError: address already in use"


def test_actor_count_fitted_to_the_cluster(capsys):
    from madclip_runtime.serve.batch import fit_actors

    assert fit_actors(64, 1.0, 0.0, 0.5, {"CPU": 2.0}) == 1
    assert "--actors 64" in capsys.readouterr().err
    assert fit_actors(2, 0.5, 0.0, 0.5, {"CPU": 2.0}) == 2
    with pytest.raises(MadclipError, match="cpus-per-actor"):
        fit_actors(1, 4.0, 0.0, 0.5, {"CPU": 2.0})
    with pytest.raises(MadclipError, match="gpus-per-actor"):
        fit_actors(1, 0.5, 1.0, 0.5, {"CPU": 2.0})


# ------------------------------------------------------------------------------------------ trusted key


def test_serve_and_batch_refuse_an_unsigned_bundle_with_a_trusted_key(
    standin, keys, no_ray, tmp_path, capsys
):
    from madclip_runtime.serve.batch import main as batch_main
    from madclip_runtime.serve.cli import main as serve_main

    pub = str(keys / "lab.pub")
    line = _one_line(capsys, serve_main, ["--bundle", str(standin), "--trusted-key", pub])
    assert "unsigned bundle refused" in line
    (tmp_path / "a.png").write_bytes(b"")
    line = _one_line(
        capsys,
        batch_main,
        [
            str(tmp_path / "a.png"),
            "--bundle",
            str(standin),
            "--out",
            str(tmp_path / "o"),
            "--trusted-key",
            pub,
        ],
    )
    assert "unsigned bundle refused" in line
    other = _signed_copy(standin, tmp_path / "other", keys / "other.key")
    line = _one_line(capsys, serve_main, ["--bundle", str(other), "--trusted-key", pub])
    assert "not by the trusted key" in line


def test_client_verifies_what_the_server_publishes(standin, keys, tmp_path):
    import base64

    from madclip_runtime.predictor import load
    from madclip_runtime.serve.client import trusted_key_id, verify_server_bundle
    from madclip_runtime.serve.replica import metadata

    def doc(bundle: Path) -> dict:
        with load(bundle, backend="ort-cpu") as p:
            return json.loads(json.dumps(metadata(p, None)))  # as it travels

    pub = keys / "lab.pub"
    with pytest.raises(BundleError, match="unsigned bundle refused"):
        verify_server_bundle(doc(standin), "http://x", pub)
    signed = doc(_signed_copy(standin, tmp_path / "lab", keys / "lab.key"))
    assert signed["signed_by"] == trusted_key_id(pub) == verify_server_bundle(signed, "http://x", pub)
    with pytest.raises(BundleError, match="not by the trusted key"):
        verify_server_bundle(doc(_signed_copy(standin, tmp_path / "o", keys / "other.key")), "http://x", pub)
    forged = dict(signed)
    meta = json.loads(base64.b64decode(signed["bundle_metadata"]))
    meta["calibration"]["threshold"] = 0.0  # an edit after signing, re-advertised consistently
    raw = json.dumps(meta).encode()
    import hashlib

    forged.update(
        bundle_metadata=base64.b64encode(raw).decode(), bundle_sha256=hashlib.sha256(raw).hexdigest()
    )
    with pytest.raises(BundleError):
        verify_server_bundle(forged, "http://x", pub)
    with pytest.raises(BundleError, match="bundle_sha256"):
        verify_server_bundle({**signed, "bundle_sha256": "0" * 64}, "http://x", pub)
    with pytest.raises(BundleError, match="does not publish"):
        verify_server_bundle({k: v for k, v in signed.items() if k != "bundle_metadata"}, "http://x", pub)


# ------------------------------------------------------------------------------------------ one scoring path


def test_replica_readiness_is_the_selftest_golden_check(standin, tmp_path):
    """A golden set whose score_map_max (or decisions) the model no longer reproduces keeps a replica out."""
    from madclip_runtime.bundles.bundle import write_metadata
    from madclip_runtime.serve.replica import ServeConfig, open_verified

    p, meta = open_verified(ServeConfig(bundle=str(standin), backend="ort-cpu"))
    p.close()
    assert meta["warmup_selftest"]["score_map_max_max_abs_err"] <= 1e-4
    bad = tmp_path / "bad"
    shutil.copytree(standin, bad)
    with np.load(bad / "golden.npz") as z:
        golden = {k: z[k] for k in z.files}
    golden["score_map_max"] = golden["score_map_max"] + 0.5  # only score_map_max is off
    np.savez(bad / "golden.npz", **golden)
    write_metadata(bad, json.loads((bad / "metadata.json").read_text()))
    with pytest.raises(BundleError, match="score_map_max err"):
        open_verified(ServeConfig(bundle=str(bad), backend="ort-cpu"))


def _calls(path: Path, attr: str) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == attr
        and isinstance(n.func.value, ast.Attribute)
        and n.func.value.attr == "backend"
    ]


def test_one_model_call_and_no_private_imports():
    """Only Predictor runs the backend; no module of the serving territory imports another's private names."""
    runtime = ROOT / "madclip_runtime"
    callers = {str(p.relative_to(ROOT)) for p in runtime.rglob("*.py") if _calls(p, "run")}
    # madclip-bench times the raw backend on purpose (throughput without pre/post-processing)
    assert callers - {"madclip_runtime/cli/bench.py"} == {"madclip_runtime/predictor.py"}, callers
    territory = [
        *(runtime / "serve").glob("*.py"),
        runtime / "predictor.py",
        runtime / "bundles" / "selftest.py",
        runtime / "outputs.py",
        runtime / "cli" / "infer.py",
        runtime / "cli" / "results.py",
    ]
    private = []
    for path in territory:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private += [
                    f"{path.name}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]
    assert not private, private
    client = (runtime / "serve" / "client.py").read_text(encoding="utf-8")
    assert "cli.infer" not in client and "def run_remote(args: argparse.Namespace) -> int" in client


def test_decode_turns_a_reader_crash_into_this_request_error(monkeypatch):
    from madclip_runtime.serve import decode

    def crash(*a, **k):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(decode, "read_scans", crash)
    with pytest.raises(InputError, match=r"case.nii.gz: cannot read this scan \(LinAlgError"):
        decode.decode_scan_bytes(b"\x1f\x8b....", "case.nii.gz")


def test_config_file_args_validated_like_the_options(standin, keys):
    """Serve config files (`app_builder` args) go through the same validators as madclip-serve's options."""
    from madclip_runtime.serve.options import serve_config_from

    for key, bad in (
        ("max_body_mb", "nan"),
        ("threshold", "inf"),
        ("max_uploads", "0"),
        ("body_timeout", "-1"),
    ):
        with pytest.raises(MadclipError, match=key):
            serve_config_from({"bundle": str(standin), key: bad})
    cfg = serve_config_from(
        {"bundle": str(standin), "max_body_mb": "2", "trusted_key": str(keys / "lab.pub"), "max_uploads": 4}
    )
    assert cfg.max_body_bytes == 2 * 2**20 and cfg.max_uploads == 4
    assert cfg.trusted_key == (keys / "lab.pub").read_bytes()
    with pytest.raises(MadclipError):
        serve_config_from({"bundle": str(standin), "trusted_key": str(standin / "metadata.json")})
