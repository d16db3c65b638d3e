"""CUDA IPC tensor payloads name their GPU by UUID, as SGLang's patched torch reductions expect.

GPU only (skipped here). The sender pickles CUDA tensors with `serialize_per_rank`; the pickle
must carry the GPU's UUID (not its index, which differs between processes with different
CUDA_VISIBLE_DEVICES) and torch's allowlisted `rebuild_cuda_tensor` as the rebuild function;
another process opens it through the engine's allowlisted unpickler and sees the same bytes.
"""

import base64
import multiprocessing as mp

import pytest
import torch

from erpo_mega.rollout.tensor_wire import align_order, flatten_bucket, serialize_per_rank

pytestmark = pytest.mark.gpu


def _open_in_child(payload: str, queue) -> None:
    import torch

    from erpo_mega.rollout.engine.engine import _named_tensors_from_payload
    from erpo_mega.rollout.tensor_wire import deserialize_named_tensors

    named = _named_tensors_from_payload(deserialize_named_tensors(payload), "flattened_bucket")
    queue.put([(n, t.device.type, t.cpu().clone()) for n, t in named])
    torch.cuda.synchronize()


def test_cuda_ipc_payload_names_gpu_by_uuid_and_opens_in_another_process():
    named = align_order([("a", torch.randn(4, 3, device="cuda")),
                         ("b", torch.randn(5, device="cuda").to(torch.bfloat16)),
                         ("c", torch.arange(7, device="cuda", dtype=torch.int32))])
    flat, metas = flatten_bucket(named)
    (payload,) = serialize_per_rank({"flattened_tensor": flat, "metadata": metas}, 1)
    raw = base64.b64decode(payload)
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    assert uuid.encode() in raw
    assert b"rebuild_cuda_tensor" in raw and b"erpo_mega" not in raw  # only globals SGLang allows
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_open_in_child, args=(payload, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(60)
    assert child.exitcode == 0
    for (n, t), (n2, device, t2) in zip(named, got):
        assert n == n2 and device == "cuda" and torch.equal(t.cpu(), t2)


def test_weight_group_backend_is_nccl_on_cuda():
    from erpo_mega.weights.transport import default_backend

    assert default_backend() == "nccl"
