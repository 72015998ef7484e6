"""What the trust checks cost at load: metadata integrity record, signature, validation (issue 10).

    python benchmarks/bench_trust.py --bundle BUNDLE [--repeats 200]

Times, per load of BUNDLE's metadata.json (median of --repeats): JSON parsing, the per-field integrity check,
the Ed25519 signature check (the bundle is copied and signed with a fresh key), the validation of every value,
and load_bundle(verify="none") end to end. The sha256 of model files (verify="model"/"all") is not part of
this: it existed before and scales with the model size (see RESULTS.md's runtime section). Prints a table and
writes benchmarks/results/trust.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_machine, table, write_json  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    from madclip_runtime.bundles import integrity
    from madclip_runtime.bundles.bundle import load_bundle, write_metadata
    from madclip_runtime.bundles.metadata_schema import validate_metadata
    from madclip_runtime.bundles.signing import (
        generate_keypair,
        load_private_key,
        load_public_key,
        verify_signature,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        b = Path(tmp) / "b"
        shutil.copytree(args.bundle, b)
        generate_keypair(Path(tmp) / "k.key", Path(tmp) / "k.pub")
        write_metadata(
            b,
            json.loads((b / "metadata.json").read_text()),
            signing_key=load_private_key(Path(tmp) / "k.key"),
        )
        text = (b / "metadata.json").read_text()
        meta = json.loads(text)
        pub = load_public_key(Path(tmp) / "k.pub")
        where = str(b / "metadata.json")
        n = args.repeats
        rows = [
            ["json.loads(metadata.json)", _median_ms(lambda: json.loads(text), n)],
            ["integrity.check (per-field digests)", _median_ms(lambda: integrity.check(meta, where), n)],
            [
                "verify_signature (Ed25519, trusted key)",
                _median_ms(lambda: verify_signature(meta, where, pub), n),
            ],
            ["validate_metadata (every value)", _median_ms(lambda: validate_metadata(meta, where), n)],
            [
                "load_bundle(verify='none'), signed bundle",
                _median_ms(lambda: load_bundle(b, verify="none"), n),
            ],
        ]
        size = len(text.encode())
    table(
        f"trust checks per load (median of {n}; metadata.json {size} bytes, {len(meta['files'])} files listed)",
        ["step", "ms"],
        rows,
    )
    write_json(
        "trust.json",
        {
            "bundle": str(args.bundle),
            "metadata_bytes": size,
            "repeats": n,
            "rows": [{"step": r[0], "median_ms": r[1]} for r in rows],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
