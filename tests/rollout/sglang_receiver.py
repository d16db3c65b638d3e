"""A stand-in engine TP rank that receives a weight broadcast with SGLang 0.5.23's own code.

`python -m tests.rollout.sglang_receiver PORT RANK WORLD SPEC_JSON`: joins the group with
SGLang's `init_custom_process_group` (gloo, tcp:// rendezvous at the trainer, as its weight
updater does for rank `rank_offset + tp_rank`), allocates the bucket with its
`FlattenedTensorBucket.empty(names, dtypes, shapes)`, receives `broadcast(src=0)` and prints
the reconstructed tensors' bytes as JSON (hex).
"""

import json
import sys

import torch

from tests import sglang_referee as ref


def main(port: int, rank: int, world: int, spec: list) -> None:
    ns = ref.load()
    names, dtypes, shapes = spec
    pg = ns.common.init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}",
                                             world_size=world, rank=rank, group_name="weight_update_group")
    bucket = ns.bucket.FlattenedTensorBucket.empty(names, dtypes, shapes, "cpu")
    torch.distributed.broadcast(bucket.get_flattened_tensor(), src=0, group=pg)
    print(json.dumps({n: t.contiguous().view(torch.uint8).numpy().tobytes().hex()
                      for n, t in bucket.reconstruct_tensors()}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
