"""The native-kernel loader: builds once, caches by content, falls back or fails loudly as configured."""

import ctypes
import os
import subprocess
import sys

import pytest

import erpo_mega.native as native

SRC = r"""
double erpo_test_dot(const float *a, const float *b, long n) {
    double s = 0.0;
    for (long i = 0; i < n; ++i) s += (double)a[i] * b[i];
    return s;
}
"""


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("ERPO_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_status", {})
    src = tmp_path / "dot.c"
    src.write_text(SRC)
    return src


def _dot(lib, xs, ys):
    fn = lib.erpo_test_dot
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    fn.restype = ctypes.c_double
    a = (ctypes.c_float * len(xs))(*xs)
    b = (ctypes.c_float * len(ys))(*ys)
    return fn(ctypes.addressof(a), ctypes.addressof(b), len(xs))


def test_builds_runs_and_caches_by_content(fresh, tmp_path, monkeypatch):
    monkeypatch.delenv("ERPO_NATIVE", raising=False)
    lib = native.load_library("dot", source=fresh)
    assert lib is not None and native.native_status("dot") == "native"
    assert _dot(lib, [1.0, 2.0, 3.0], [4.0, -5.0, 0.5]) == pytest.approx(1 * 4 - 2 * 5 + 1.5)
    built = sorted((tmp_path / "cache").glob("dot-*.so"))
    assert len(built) == 1
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == "0o700"
    # same process: memoised; a new process finds the cached build and compiles nothing
    assert native.load_library("dot", source=fresh) is lib
    mtime = built[0].stat().st_mtime_ns
    code = ("import erpo_mega.native as n, sys; "
            f"sys.exit(0 if n.load_library('dot', source={str(fresh)!r}) is not None else 1)")
    env = dict(os.environ, CC="/nonexistent-compiler")  # a rebuild would fail: the cache must be hit
    env.pop("ERPO_NATIVE", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert built[0].stat().st_mtime_ns == mtime
    # changed source or flags: a new build next to the old one
    fresh.write_text(SRC + "\nint erpo_test_other(void) { return 7; }\n")
    native._loaded.clear()
    lib2 = native.load_library("dot", source=fresh, extra_cflags=("-DX=1",))
    assert lib2.erpo_test_other() == 7
    assert len(list((tmp_path / "cache").glob("dot-*.so"))) == 2


def test_off_broken_and_require(fresh, tmp_path, monkeypatch):
    monkeypatch.setenv("ERPO_NATIVE", "0")
    assert native.load_library("dot", source=fresh) is None
    assert "ERPO_NATIVE=0" in native.native_status("dot")
    bad = tmp_path / "bad.c"
    bad.write_text("int broken( { return; }\n")
    monkeypatch.setenv("ERPO_NATIVE", "1")
    assert native.load_library("bad", source=bad) is None
    assert "torch fallback" in native.native_status("bad") and "bad.c" in native.native_status("bad")
    assert not list((tmp_path / "cache").glob("*.so")) and not list((tmp_path / "cache").glob(".bad-*"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("ERPO_NATIVE", "require")
    with pytest.raises(native.NativeBuildError, match="bad.c"):
        native.load_library("bad", source=bad)
    monkeypatch.setenv("ERPO_NATIVE", "maybe")
    with pytest.raises(ValueError, match="ERPO_NATIVE"):
        native.load_library("dot", source=fresh)


def test_refuses_a_cache_others_can_write(fresh, tmp_path, monkeypatch):
    monkeypatch.delenv("ERPO_NATIVE", raising=False)
    shared = tmp_path / "cache"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert native.load_library("dot", source=fresh) is None
    assert "world-writable" in native.native_status("dot")
