"""Small compiled CPU kernels, built on first use with the system C compiler and loaded with ctypes.

Why not a torch C++ extension: including torch's headers makes every build take about a minute on two
cores; these kernels are plain C11 over raw fp32 pointers, compile in about a second and need
nothing but ``cc``. Every kernel has a torch fallback: when no compiler is found, the build fails,
or ``ERPO_NATIVE=0`` is set, :func:`load_library` returns ``None`` and :func:`native_status` says why.
``ERPO_NATIVE=require`` turns those cases into an error (CI uses it so the native paths are tested).

Builds are cached per user (``ERPO_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/erpo_mega/native``, else
``~/.cache/erpo_mega/native``), keyed by the source, the flags and the CPU's feature flags:
``-march=native`` code built on one node of a cluster whose home directory is shared is never loaded
on a node with a different CPU. The cache directory must belong to the user and be closed to
others (a library found there is executed). Concurrent first uses (one process per rank) build once
under a file lock; the library appears under its final name by an atomic rename.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SRC_DIR = Path(__file__).resolve().parent / "src"
BASE_CFLAGS = ("-O3", "-march=native", "-std=c11", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")
LIBS = ("-lm",)


class NativeBuildError(RuntimeError):
    """A kernel could not be built or loaded while ``ERPO_NATIVE=require`` is set."""


_lock = threading.Lock()
_loaded: dict[tuple[str, tuple[str, ...]], ctypes.CDLL | None] = {}
_status: dict[str, str] = {}


def native_mode() -> str:
    """``off``, ``auto`` (default) or ``require``, from ``ERPO_NATIVE``."""
    raw = os.environ.get("ERPO_NATIVE", "1").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw == "require":
        return "require"
    if raw in ("", "1", "on", "true", "yes", "auto"):
        return "auto"
    raise ValueError(f"ERPO_NATIVE={raw!r}: expected 0, 1 or require")


def native_status(name: str) -> str:
    """Why the library ``name`` is or is not in use (for logs and bench output)."""
    return _status.get(name, "not requested yet")


def cache_dir() -> Path:
    env = os.environ.get("ERPO_NATIVE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "erpo_mega" / "native"


def _private_dir(path: Path) -> Path:
    """Create ``path`` (mode 700) and refuse it unless it is ours and closed to group and others."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path}: native-kernel cache must be owned by uid {os.getuid()} and not "
                              f"group/world-writable (owner {st.st_uid}, mode {oct(st.st_mode & 0o777)})")
    return path


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc if shutil.which(cc) else None
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def _build(name: str, source: Path, cflags: tuple[str, ...]) -> ctypes.CDLL:
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join(cflags).encode(), _cpu_flags().encode()])).hexdigest()[:20]
    out_dir = _private_dir(cache_dir())
    target = out_dir / f"{name}-{key}.so"
    with open(out_dir / f"{name}-{key}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not target.exists():
            cc = _compiler()
            if cc is None:
                raise NativeBuildError("no C compiler found (set CC, or install gcc)")
            fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
            os.close(fd)
            cmd = [cc, *cflags, "-o", tmp, str(source), *LIBS]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                os.unlink(tmp)
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
                raise NativeBuildError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
            os.replace(tmp, target)
    return ctypes.CDLL(str(target))


def address(t, first: int = 0) -> ctypes.c_void_p:
    """Address of element `first` along dim 0 of a CPU tensor, as a kernel pointer argument (no
    bounds check: callers check dtype, device and layout, and size their calls)."""
    return ctypes.c_void_p(t.data_ptr() + first * t.stride(0) * t.element_size() if first else t.data_ptr())


def load_library(name: str, *, source: str | Path | None = None,
                 extra_cflags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library ``name`` (``src/<name>.c`` unless ``source`` is given), or ``None``.

    Built once per process and flag set; the caller sets ``argtypes``/``restype`` on the result.
    """
    mode = native_mode()
    cflags = (*BASE_CFLAGS, *extra_cflags)
    key = (name, cflags)
    with _lock:
        if mode == "off":  # checked first: ERPO_NATIVE=0 set after a load still disables the kernels
            _status[name] = "disabled by ERPO_NATIVE=0"
            return None
        if key in _loaded:
            return _loaded[key]
        src = Path(source) if source is not None else SRC_DIR / f"{name}.c"
        try:
            if not src.is_file():
                raise NativeBuildError(f"{src}: kernel source not found")
            lib = _build(name, src, cflags)
        except (NativeBuildError, OSError, subprocess.SubprocessError) as exc:
            if mode == "require":
                raise NativeBuildError(f"native kernel {name!r} unavailable with ERPO_NATIVE=require: {exc}") from exc
            _status[name] = f"torch fallback: {exc}"
            log.warning("native kernel %s unavailable, using the torch path: %s", name, exc)
            _loaded[key] = None
            return None
        _status[name] = "native"
        _loaded[key] = lib
        return lib
