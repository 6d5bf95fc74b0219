"""Benchmark: what signing and verifying a folder of teacher data costs (trait_guard.signing).

Writes a folder of random files (default 1 GiB in 16 files) to a temporary directory, then times
``sign_folder`` (hash every file, sign the statement) and ``verify_folder`` (check the signature with
a trusted key, hash every file again) a few times each, beside plain SHA-256 hashing of the same
bytes, the floor both stand on (interleaved: one of each per repeat). The page cache is warm after the first pass (the files were just
written), so these are CPU costs, not disk costs.

    nice -n 10 python benchmarks/signing.py --gib 1 --files 16 --repeats 5 --out benchmarks/results/signing.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from trait_guard.signing import create_keypair, load_trusted_keys, sign_folder, verify_folder


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def _sha256_all(folder: Path) -> None:
    for path in sorted(folder.glob("*.bin")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="total size of the folder (GiB)")
    parser.add_argument("--files", type=int, default=16, help="number of files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/signing.json")
    args = parser.parse_args()

    total = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory() as tmp:
        folder, keys = Path(tmp, "data"), Path(tmp, "keys")
        folder.mkdir()
        per_file = total // args.files
        for i in range(args.files):
            with open(folder / f"part-{i:03d}.bin", "wb") as handle:
                for _ in range(per_file // (1 << 24)):
                    handle.write(os.urandom(1 << 24))
                handle.write(os.urandom(per_file % (1 << 24)))
        private, public = create_keypair(keys, name="bench")
        trusted = load_trusted_keys([public])
        hashing, signing, verifying = [], [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits all three alike
            hashing += _timed(lambda: _sha256_all(folder), 1)
            signing += _timed(lambda: sign_folder(folder, str(private)), 1)
            verifying += _timed(lambda: verify_folder(folder, trusted), 1)
        envelope_bytes = (folder / "provenance.sig.json").stat().st_size
    size_gib = args.files * per_file / (1 << 30)
    result = {
        "folder_gib": round(size_gib, 3), "files": args.files, "repeats": args.repeats,
        "sha256_only_seconds": round(statistics.median(hashing), 3),
        "sign_seconds": round(statistics.median(signing), 3),
        "verify_seconds": round(statistics.median(verifying), 3),
        "sign_gib_per_second": round(size_gib / statistics.median(signing), 3),
        "verify_gib_per_second": round(size_gib / statistics.median(verifying), 3),
        "envelope_bytes": envelope_bytes,
        "all_seconds": {"sha256_only": hashing, "sign": signing, "verify": verifying},
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "command": f"nice -n 10 python benchmarks/signing.py --gib {args.gib:g} --files {args.files} "
                   f"--repeats {args.repeats} --out {args.out}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("all_seconds", "machine")}, indent=2))


if __name__ == "__main__":
    main()
