"""The t-digest, compiled with mypyc when a build for the current source exists.

The crate's per-sample recompression of up to 100 centroids is the learner's
hottest loop; mypyc compiles `tdigest.py` unchanged (it is fully typed) and
runs it about 2x faster here, with the same IEEE double arithmetic and so
the same bits (the crate-vector tests run on whichever is selected, and a
test compares the two).

`make install` builds `_tdigest_native*.so` next to this file from a copy of
`tdigest.py` that records the source's SHA-256; it is used only while that
hash matches the current `tdigest.py`, so an edited source never runs stale
compiled code. Without a compiler, or in the Docker image, the pure Python
module is used: slower, identical results.

Build: `python -m worker.engine.native build`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from worker.engine import tdigest as _pure

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "tdigest.py"
NATIVE_NAME = "_tdigest_native"


def source_sha() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def _load_native() -> ModuleType | None:
    try:
        from worker.engine import _tdigest_native as native  # type: ignore[attr-defined]
    except ImportError:
        return None
    return native if getattr(native, "SOURCE_SHA", None) == source_sha() else None


_native = _load_native()
IMPLEMENTATION = "mypyc" if _native is not None else "python"
TDigest: type[_pure.TDigest] = _native.TDigest if _native is not None else _pure.TDigest
DEFAULT_MAX_SIZE = _pure.DEFAULT_MAX_SIZE


def build() -> int:
    """Compile `tdigest.py` with mypyc into this package; 0 on success."""
    mypyc = Path(sys.executable).with_name("mypyc")
    if not mypyc.exists():
        print("native t-digest: mypyc not installed, using pure Python", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = SOURCE.read_text(encoding="utf-8")
        (work / f"{NATIVE_NAME}.py").write_text(
            text + f'\n\nSOURCE_SHA = "{source_sha()}"\n', encoding="utf-8"
        )
        proc = subprocess.run(
            [str(mypyc), f"{NATIVE_NAME}.py"], cwd=work, capture_output=True, text=True
        )
        built = sorted(work.glob(f"{NATIVE_NAME}*.so"))
        if proc.returncode != 0 or not built:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            print("native t-digest: build failed, using pure Python:", *tail, sep="\n  ")
            return 1
        for old in HERE.glob(f"{NATIVE_NAME}*.so"):
            old.unlink()
        shutil.copy2(built[0], HERE / built[0].name)
    print(f"native t-digest: built {built[0].name}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        raise SystemExit("usage: python -m worker.engine.native build")
    raise SystemExit(build())
