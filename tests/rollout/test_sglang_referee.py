"""The SGLang referee itself: SGLang 0.5.23's own parser and deserializer run on CPU.

These checks pin what the referee can tell apart, so the protocol tests built on it cannot
pass vacuously: a good command line parses with the fields asked, a misspelt flag is refused,
SGLang's own serializer round-trips through its SafeUnpickler, and a foreign class is blocked.
"""

import importlib.util
import pickle
import sys

import pytest
import torch

from tests import sglang_referee as ref


@pytest.fixture(scope="module")
def sgl():
    return ref.require()


def test_referee_is_sglang_0_5_23_and_leaves_imports_alone(sgl):
    import sglang

    assert sglang.__version__ == ref.SGLANG_VERSION
    # the stand-ins served SGLang's import only: no finder remains for later imports
    assert not any(isinstance(f, ref._StubFinder) for f in sys.meta_path)
    assert importlib.util.find_spec("definitely_not_a_module_xyz") is None
    # ... nor stand-in modules: torch must not believe triton is installed after the referee ran
    assert not [n for n, m in sys.modules.items() if isinstance(m, ref._StubModule)]
    if not ref._really_installed("triton"):
        assert importlib.util.find_spec("triton") is None


def test_parse_server_args_accepts_and_refuses(sgl):
    args = ref.parse_server_args(["python", "-m", "sglang.launch_server", "--model-path", "/m",
                                  "--tp-size", "4", "--host", "10.1.2.3", "--port", "31000",
                                  "--api-key", "s3cret", "--enable-deterministic-inference"])
    assert (args.model_path, args.tp_size, args.dp_size, args.host, args.port, args.api_key) == \
        ("/m", 4, 1, "10.1.2.3", 31000, "s3cret")
    assert args.enable_deterministic_inference is True
    with pytest.raises(ref.SGLangRejected, match="--dp-sizee"):
        ref.parse_server_args(["--model-path", "/m", "--dp-sizee", "2"])


def test_deserializer_roundtrip_and_allowlist(sgl):
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    out = ref.deserialize(ref.serialize([("w", t)]))
    assert out[0][0] == "w" and torch.equal(out[0][1], t)

    with pytest.raises(RuntimeError, match="Blocked unsafe global"):
        ref.deserialize(pickle.dumps(Foreign()))


class Foreign:
    """Any class outside SGLang's allowlist (as our own FlattenedTensorMetadata was)."""
