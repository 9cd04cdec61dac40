"""The t-digest, compiled where a build for the current source exists.

The crate's per-sample recompression of up to 100 centroids is the learner's
hottest loop. Two builds speed it up, each with the same IEEE double
arithmetic in the same order and so the same bits (the crate-vector tests run
on whichever is selected, and tests compare each with the Python loop):

- `_tdigest_kernel*.so`, from `_tdigest_kernel.c`: the one-sample insert and
  recompression on plain doubles (~15x the mypyc loop), installed into
  `tdigest._KERNEL` of whichever TDigest is selected below;
- `_tdigest_native*.so`: `tdigest.py` compiled unchanged by mypyc (it is
  fully typed), about 2x the interpreter on everything else.

`make install` builds both next to this file; each records its source's
SHA-256 and is used only while that hash matches the current source, so an
edited source never runs stale compiled code. Without a compiler, or in the
Docker image, the pure Python module is used: slower, identical results.
`use_kernel(None)` turns the C kernel off (benchmarks compare with it).

Build: `python -m worker.engine.native build`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

from worker.engine import tdigest as _pure

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "tdigest.py"
KERNEL_SOURCE = HERE / "_tdigest_kernel.c"
NATIVE_NAME = "_tdigest_native"
KERNEL_NAME = "_tdigest_kernel"
# No fused multiply-add and no fast-math: each `a + b * c` rounds twice, as in
# Rust and Python.
KERNEL_CFLAGS = ("-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")


def source_sha(path: Path = SOURCE) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_native() -> ModuleType | None:
    try:
        from worker.engine import _tdigest_native as native  # type: ignore[attr-defined]
    except ImportError:
        return None
    return native if getattr(native, "SOURCE_SHA", None) == source_sha() else None


def _load_kernel() -> ModuleType | None:
    try:
        from worker.engine import _tdigest_kernel as kernel  # type: ignore[attr-defined]
    except ImportError:
        return None
    return kernel if getattr(kernel, "SOURCE_SHA", None) == source_sha(KERNEL_SOURCE) else None


_native = _load_native()
KERNEL = _load_kernel()
_pure._KERNEL = KERNEL
if _native is not None:
    _native._KERNEL = KERNEL
IMPLEMENTATION = ("mypyc" if _native is not None else "python") + ("+c" if KERNEL else "")
TDigest: type[_pure.TDigest] = _native.TDigest if _native is not None else _pure.TDigest
DEFAULT_MAX_SIZE = _pure.DEFAULT_MAX_SIZE


def use_kernel(kernel: ModuleType | None) -> None:
    """Select the C kernel (or None: the Python loop) for both TDigest builds."""
    _pure._KERNEL = kernel
    if _native is not None:
        _native._KERNEL = kernel


def _install(built: Path, name: str) -> None:
    """Replace this package's build(s) of `name` with `built`."""
    for old in HERE.glob(f"{name}*.so"):
        old.unlink()
    shutil.copy2(built, HERE / built.name)


def build_kernel() -> int:
    """Compile `_tdigest_kernel.c` into this package; 0 on success."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    include = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / f"{KERNEL_NAME}{suffix}"
        sha = source_sha(KERNEL_SOURCE)
        command = [*cc, *KERNEL_CFLAGS, f"-I{include}", f'-DKERNEL_SOURCE_SHA="{sha}"']
        proc = subprocess.run(
            [*command, str(KERNEL_SOURCE), "-o", str(target)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not target.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            print("t-digest C kernel: build failed, using the loop:", *tail, sep="\n  ")
            return 1
        _install(target, KERNEL_NAME)
    print(f"t-digest C kernel: built {target.name}")
    return 0


def build_mypyc() -> int:
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
        _install(built[0], NATIVE_NAME)
    print(f"native t-digest: built {built[0].name}")
    return 0


def build() -> int:
    """Both builds; 0 when both succeeded (either alone still helps)."""
    return build_kernel() | build_mypyc()


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        raise SystemExit("usage: python -m worker.engine.native build")
    raise SystemExit(build())
