"""SGLang 0.5.23's own code, importable on a CPU machine, as a referee for what we send it.

SGLang cannot serve on CPU (its kernels are CUDA-only), but the pieces that judge our bytes
and our command lines are pure Python: the CLI parser (`server_args`), the safe deserializer
(`utils.MultiprocessingSerializer` -> `SafeUnpickler`, an allowlist) and the flattened-bucket
code (`weight_sync.tensor_bucket`). They import a few GPU-only packages at module level
(triton, IPython, torchvision, ...), so for the duration of the import a meta-path finder
hands out empty stand-in modules for exactly those packages; finder and stand-ins are removed
from `sys.modules` again afterwards (and put back around each referee call), so no import
elsewhere in the process ever sees them.

Installed by `tools/setup.sh --dev` (`pip install --no-deps sglang==0.5.23` plus a few small
pure-Python packages). `available()` says whether the wheel is here; tests call `require()`,
which skips when it is absent on a developer machine but fails under CI (`CI=true`) or with
`ERPO_REQUIRE_SGLANG_REF=1`, so the referee never silently disappears from CI.

API: `parse_server_args(argv) -> ServerArgs`, `deserialize(b64_or_bytes)`,
`FlattenedTensorBucket`, `FlattenedTensorMetadata`, `SafeUnpickler`, `serialize(obj)`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import os
import sys
import threading
import types

SGLANG_VERSION = "0.5.23"

# Top-level packages SGLang imports at module level that are GPU-only (or heavy) and absent
# here; they get empty stand-ins during the import. Anything else missing still fails loudly.
STUBBED_ROOTS = frozenset({
    "triton", "IPython", "torchvision", "tvm_ffi", "sgl_kernel", "flashinfer", "vllm",
    "torchao", "xgrammar", "outlines", "llguidance", "decord", "cuda", "cuda_python", "nvidia",
    "deep_gemm", "deep_ep", "mooncake", "torch_memory_saver", "compressed_tensors", "partial_json_parser",
    "openai_harmony", "modelscope", "hf_transfer", "interegular", "soundfile", "av", "einops",
    "setproctitle", "uvloop", "uvicorn", "fastapi", "starlette", "sentencepiece", "tiktoken",
    "blobfile", "llvmlite", "numba", "cuda_bindings", "pynvml", "gguf", "timm", "scipy", "PIL",
    "openai", "anthropic", "aiohttp", "prometheus_client", "flash_attn",
    "quack", "cutlass", "nvtx", "apache_tvm_ffi", "grpc", "smg_grpc_proto", "sglang_router_rs",
})

_lock = threading.Lock()


class SGLangRejected(ValueError):
    """SGLang's own code refused the input (e.g. its argument parser exited)."""


_loaded: types.SimpleNamespace | None = None
_error: BaseException | None = None


class _Anything:
    """Stand-in for any attribute of a stubbed module: callable, decorator, subscriptable, base class."""

    def __init__(self, name: str = "stub"):
        self._name = name

    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return _Anything(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:  # used as a bare decorator
            return args[0]
        return _Anything(f"{self._name}()")

    def __getitem__(self, item):
        return _Anything(f"{self._name}[]")

    def __mro_entries__(self, bases):
        return (object,)

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __repr__(self):
        return f"<sglang_referee stub {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        return _Anything(f"{self.__name__}.{item}")


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []  # a package, so `import triton.language` works too
        mod.__version__ = "0.0.0"
        return mod

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    """Answers only for STUBBED_ROOTS that are not really installed."""

    def __init__(self):
        self.loader = _StubLoader()

    def find_spec(self, fullname, path=None, target=None):
        root = fullname.split(".", 1)[0]
        if root not in STUBBED_ROOTS:
            return None
        if root == fullname and _really_installed(root):
            return None
        if root != fullname and not isinstance(sys.modules.get(root), _StubModule):
            return None
        return importlib.machinery.ModuleSpec(fullname, self.loader, is_package=True)


def _really_installed(name: str) -> bool:
    for finder in sys.meta_path:
        if isinstance(finder, _StubFinder):
            continue
        try:
            if finder.find_spec(name, None) is not None:
                return True
        except (ImportError, AttributeError, ValueError):
            continue
    return False


_stubs: dict[str, types.ModuleType] = {}


@contextlib.contextmanager
def _stubbed_imports():
    """Stand-ins visible only inside: the finder and the stub modules leave `sys.modules`
    afterwards (SGLang keeps its references), so later imports elsewhere (torch looking for
    triton, transformers for scipy, ...) see exactly what is installed."""
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    sys.modules.update(_stubs)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name, mod in list(sys.modules.items()):
            if isinstance(mod, _StubModule):
                _stubs[name] = mod
                del sys.modules[name]


def load() -> types.SimpleNamespace:
    """Import SGLang's referee modules once (thread-safe); raises ImportError if unavailable."""
    global _loaded, _error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _error is not None:
            raise ImportError(f"SGLang referee unavailable: {_error}") from _error
        try:
            if importlib.util.find_spec("sglang") is None:
                raise ImportError("sglang is not installed (bash tools/setup.sh --dev installs it)")
            from importlib.metadata import version

            if version("sglang") != SGLANG_VERSION:
                raise ImportError(f"sglang {version('sglang')} installed, the referee pins {SGLANG_VERSION}")
            with _stubbed_imports():
                server_args = importlib.import_module("sglang.srt.server_args")
                utils = importlib.import_module("sglang.srt.utils")
                common = importlib.import_module("sglang.srt.utils.common")
                bucket = importlib.import_module("sglang.srt.weight_sync.tensor_bucket")
        except BaseException as e:  # remember: do not retry a failing import in every test
            _error = e
            raise ImportError(f"SGLang referee unavailable: {type(e).__name__}: {e}") from e
        _loaded = types.SimpleNamespace(server_args=server_args, utils=utils, common=common, bucket=bucket)
        return _loaded


def available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False


def required() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("ERPO_REQUIRE_SGLANG_REF") == "1"


def require():
    """The referee namespace; pytest.skip without it, except under CI where it must exist."""
    try:
        return load()
    except ImportError as e:
        if required():
            raise
        import pytest

        pytest.skip(str(e))


# --- the referee's verdicts --------------------------------------------------------------------
def parse_server_args(argv: list[str]):
    """SGLang's own `launch_server` parsing (`server_args.prepare_server_args`) -> ServerArgs.

    Accepts argv with or without the leading `python -m sglang.launch_server`. Raises
    `SGLangRejected` (argparse's error line) on an unknown or malformed flag, where the real
    launcher would exit. Resolution
    (`resolve_once`, which probes GPUs) is not run; the checks that matter for weight sync
    (dp 1, tp as asked, host, api key) are on the returned raw fields. SGLang reconfigures the
    root logger while parsing; it is restored afterwards.
    """
    import logging

    sa = load().server_args
    argv = [str(a) for a in argv]
    if "sglang.launch_server" in argv:
        argv = argv[argv.index("sglang.launch_server") + 1:]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), _stubbed_imports():
            return sa.prepare_server_args(argv)
    except SystemExit as e:  # argparse's verdict, with its last line ("error: ...") kept
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise SGLangRejected(lines[-1] if lines else f"argparse exit {e.code}") from None
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


def deserialize(payload):
    """SGLang's `MultiprocessingSerializer.deserialize` (base64 str or raw bytes) via SafeUnpickler."""
    ns = load()
    with _stubbed_imports():
        return ns.common.MultiprocessingSerializer.deserialize(payload)


def serialize(obj, output_str: bool = True):
    ns = load()
    with _stubbed_imports():
        return ns.common.MultiprocessingSerializer.serialize(obj, output_str=output_str)


def reconstruct_flattened(payload_obj) -> list:
    """What SGLang's weight updater does with a deserialized `flattened_bucket` payload."""
    b = load().bucket
    metas = [b.FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                       end_idx=m.end_idx, numel=m.numel) for m in payload_obj["metadata"]]
    return b.FlattenedTensorBucket(flattened_tensor=payload_obj["flattened_tensor"],
                                   metadata=metas).reconstruct_tensors()


def __getattr__(name):  # FlattenedTensorBucket, FlattenedTensorMetadata, SafeUnpickler, ServerArgs
    ns = load()
    for mod in (ns.bucket, ns.common, ns.server_args):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(name)
