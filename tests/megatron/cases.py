"""Module-level routines the megatron tests run on spawned gloo ranks (one spawn per world size)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist

from erpo_mega.algo import LossConfig, LossNormalizer, policy_loss
from erpo_mega.megatron.batching import PolicyBatch
from erpo_mega.megatron.config import OptimConfig, ParallelConfig
from erpo_mega.megatron.logprob import packing_of, plan_for_this_rank
from erpo_mega.megatron.train_step import forward_backward
from erpo_mega.megatron.worker import PolicyWorker
from tests.megatron.helpers import MODEL, gather_full, make_rollout, set_full_weights, training_batch

TEMPERATURE = 0.9
OPTIM = OptimConfig(lr=1e-3, adam_eps=1e-6, weight_decay=0.01, clip_grad=1.0, warmup_steps=0, total_steps=100)
LOSS = LossConfig(kl_coef=0.05, entropy_coef=0.01, tis_cap=2.0)


def _dp() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _setup(tp: int, pp: int, budget: int) -> PolicyWorker:
    gc.collect()
    worker = PolicyWorker().setup(MODEL, ParallelConfig(tp=tp, pp=pp, micro_batch_tokens=budget), OPTIM, bf16=False)
    set_full_weights(worker.modules.unwrapped()[0])
    return worker


def _first_batch(worker: PolicyWorker):
    prompts, responses, groups, rewards = make_rollout()
    logp, entropy = worker.compute_logprobs(PolicyBatch(prompts, responses), temperature=TEMPERATURE)
    batch, stats = training_batch(prompts, responses, groups, rewards, logp)
    return batch, logp, entropy, stats


def run_layout(tp: int, pp: int, budget: int, loss_cfg: LossConfig = LOSS) -> dict:
    """Log-prob pass, ERPO advantages, gradients (DP=1 only) and one optimizer step."""
    worker = _setup(tp, pp, budget)
    model = worker.modules.unwrapped()[0]
    seen: list[int] = []  # rows entering this stage's first layer (at PP > 1 stage 2: what p2p delivered)
    hook = model.decoder.layers[0].register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(int(kw["hidden_states"].shape[0])), with_kwargs=True)
    batch, logp, entropy, stats = _first_batch(worker)
    out = {"logp": logp, "entropy": entropy, "advantages": batch.advantages, "cdp_fraction": stats["cdp_fraction"]}
    if _dp() == 1:  # with the distributed optimizer main_grad is only valid on this rank's shard
        fb = forward_backward(worker.model_chunks, batch, loss_cfg, vocab_size=MODEL.vocab_size,
                              micro_batch_tokens=budget, temperature=TEMPERATURE)
        out["fb_metrics"] = fb
        out["grads"] = gather_full(model, lambda p: p.main_grad)
    out["metrics"] = worker.train_step(batch, loss_cfg, temperature=TEMPERATURE)
    out["params"] = gather_full(model)
    out["batch"] = batch
    hook.remove()
    out["stage_input_lengths"] = seen
    out["packing"] = packing_of(worker.model_chunks)
    out["planned_lengths"] = [mb.num_tokens for mb in plan_for_this_rank(batch, budget)]
    return out


def _unpacked_reference(worker: PolicyWorker, batch: PolicyBatch, loss_cfg: LossConfig) -> dict:
    """Independent of packing, the schedule and vocab parallelism: each sample alone through
    the model, full-vocabulary log_softmax, the loss on the whole [N, T] batch, autograd."""
    model = worker.modules.unwrapped()[0]
    v = MODEL.vocab_size
    logps, ents = torch.zeros(batch.num_samples, batch.max_response_len), torch.zeros(
        batch.num_samples, batch.max_response_len)
    for chunk in worker.model_chunks:
        chunk.zero_grad_buffer()
    for i, (p, r) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        full = torch.tensor(p + r)
        ids = full[None, :-1]
        s = ids.shape[1]
        causal = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
        logits = model(ids, torch.arange(s)[None], causal)[0, :, :v].float() / TEMPERATURE
        lsm = torch.log_softmax(logits, dim=-1)[len(p) - 1:]
        logps[i, :len(r)] = lsm.gather(1, full[len(p):, None]).squeeze(1)
        ents[i, :len(r)] = -(lsm.exp() * lsm).sum(-1)
    mask = batch.response_mask()
    loss, _ = policy_loss(logps, batch.old_logp, batch.advantages, mask, loss_cfg,
                          normalizer=LossNormalizer.from_mask(mask), ref_logp=batch.ref_logp,
                          rollout_logp=batch.rollout_logp, entropy=ents)
    loss.backward()
    grads = gather_full(model, lambda p: p.main_grad)
    for chunk in worker.model_chunks:
        chunk.zero_grad_buffer()
    return {"logp": logps.detach(), "entropy": ents.detach(), "loss": float(loss), "grads": grads}


def single_rank_checks() -> dict:
    """World of one: (1,1,1) reference, packing/budget independence, unpacked reference."""
    results = {"ref": run_layout(1, 1, budget=64)}
    results["budget_small"] = run_layout(1, 1, budget=20)  # many micro-batches
    # one micro-batch (~130 tokens), through the query-chunked attention path with 16-token
    # chunks and per-chunk masks from the segment ids (rows this short normally fall back)
    from erpo_mega.models.chunked_attention import ChunkedDotProductAttention

    default_chunk, ChunkedDotProductAttention.chunk_tokens = ChunkedDotProductAttention.chunk_tokens, 16
    try:
        results["budget_huge"] = run_layout(1, 1, budget=10_000)
    finally:
        ChunkedDotProductAttention.chunk_tokens = default_chunk
    seq_mean = LossConfig(aggregation="seq-mean-token-mean", kl_coef=0.05, tis_cap=2.0)
    results["seqmean_small"] = run_layout(1, 1, budget=20, loss_cfg=seq_mean)
    results["seqmean_large"] = run_layout(1, 1, budget=64, loss_cfg=seq_mean)
    # independent reference at the initial weights
    worker = _setup(1, 1, 64)
    batch, logp, entropy, _ = _first_batch(worker)
    results["unpacked"] = _unpacked_reference(worker, batch, LOSS)
    results["unpacked_seqmean"] = _unpacked_reference(worker, batch, seq_mean)
    results["logits_grad"] = _inplace_vs_fresh_logits_grad(worker, batch)
    return results


def _inplace_vs_fresh_logits_grad(worker: PolicyWorker, batch: PolicyBatch) -> dict:
    """forward_backward with the logits' gradient written in place (the default) and into a fresh buffer."""
    model = worker.modules.unwrapped()[0]
    out = {}
    for name, inplace in (("inplace", True), ("fresh", False)):
        fb = forward_backward(worker.model_chunks, batch, LOSS, vocab_size=MODEL.vocab_size, micro_batch_tokens=64,
                              temperature=TEMPERATURE, inplace_logits_grad=inplace)
        out[name] = {"metrics": fb, "grads": gather_full(model, lambda p: p.main_grad)}
    for chunk in worker.model_chunks:
        chunk.zero_grad_buffer()
    return out


def two_rank_layouts() -> dict | None:
    """World of two: (2,1,1), (1,2,1) and (1,1,2) in the same processes."""
    out = {}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        res = run_layout(tp, pp, budget=40)
        out[name] = res if dist.get_rank() == 0 else {
            "metrics": res["metrics"], "logp": res["logp"], "stage_input_lengths": res["stage_input_lengths"]}
    return out


def _rng_probe() -> torch.Tensor:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(2)
    return torch.cat([torch.rand(2), tracked])


def four_rank_layout_and_checkpoints(root: str) -> dict:
    """World of four: (2,2,1) layout results, then save/load across (2,2,1) <-> (1,1,4).

    Routine saves use the sharded optimizer format: (2,2,1) -> (1,1,4) goes through the
    reshard tool (run at the saved layout); (1,1,4) -> (2,2,1) saves reshardable directly.
    """
    from erpo_mega.megatron.reshard import reshard_checkpoint

    out: dict = {}
    root_a, root_b = Path(root) / "tp2pp2", Path(root) / "dp4"
    root_ar = Path(root) / "tp2pp2_resharded"

    # (2,2,1): step 1 (layout comparison), save, step 2 as the uninterrupted reference
    worker = _setup(2, 2, budget=40)
    rank0 = dist.get_rank() == 0
    model = worker.modules.unwrapped()[0]
    batch, logp, entropy, _ = _first_batch(worker)
    fb = forward_backward(worker.model_chunks, batch, LOSS, vocab_size=MODEL.vocab_size, micro_batch_tokens=40,
                          temperature=TEMPERATURE)
    grads = gather_full(model, lambda p: p.main_grad)
    m1 = worker.train_step(batch, LOSS, temperature=TEMPERATURE)
    p1 = gather_full(model)
    out["layout"] = {"logp": logp, "metrics": m1, "fb_metrics": fb, "grads": grads if rank0 else None,
                     "params": p1 if rank0 else None, "advantages": batch.advantages}
    worker.save(root_a, extra={"cursor": 17, "note": "after step 1"})
    rng_after_save = _rng_probe()
    m2 = worker.train_step(batch, LOSS, temperature=TEMPERATURE)
    p2 = gather_full(model)
    # the sharded save resumes exactly at its own layout
    worker.load(root_a)
    m2_same = worker.train_step(batch, LOSS, temperature=TEMPERATURE)
    p2_same = gather_full(model)
    reshard_checkpoint(root_a, root_ar)

    # (1,1,4): resume from the (2,2,1) checkpoint
    worker = _setup(1, 1, budget=40)
    model = worker.modules.unwrapped()[0]
    sharded_elsewhere = _load_error(worker, root_a)
    extra = worker.load(root_ar)
    loaded_b = gather_full(model)
    m2_b = worker.train_step(batch, LOSS, temperature=TEMPERATURE)
    p2_b = gather_full(model)
    worker.save(root_b, extra={"cursor": 18}, optim_format="reshardable")
    m3_b = worker.train_step(batch, LOSS, temperature=TEMPERATURE)
    p3_b = gather_full(model)

    # back to (2,2,1): resume from the (1,1,4) checkpoint
    worker = _setup(2, 2, budget=40)
    model = worker.modules.unwrapped()[0]
    extra_c = worker.load(root_b)
    step_c = worker.step
    loaded_c = gather_full(model)
    m3_c = worker.train_step(batch, LOSS, temperature=TEMPERATURE)
    p3_c = gather_full(model)

    # same layout as saved: RNG streams come back too
    worker.load(root_a)
    rng_after_load = _rng_probe()

    def diff(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    out["resume"] = {
        "extra": extra, "extra_c": extra_c, "step_c": step_c,
        "load_tp2pp2_at_dp4": diff(p1, loaded_b), "load_dp4_at_tp2pp2": diff(p2_b, loaded_c),
        "step2_loss": (m2["loss"], m2_b["loss"]), "step2_params": diff(p2, p2_b),
        "step3_loss": (m3_b["loss"], m3_c["loss"]), "step3_params": diff(p3_b, p3_c),
        "step2_grad_norm": (m2["grad_norm"], m2_b["grad_norm"]),
        "step2_same_layout": (m2["loss"], m2_same["loss"], diff(p2, p2_same)),
        "sharded_elsewhere": sharded_elsewhere,
        "rng": (rng_after_save, rng_after_load),
    }

    # damaged checkpoints: every rank must get the same clear error, none may hang
    ckpt_dir = root_b / "iter_0000002"
    victim = sorted(ckpt_dir.glob("*.distcp"))[0]
    errors = {}
    dist.barrier()
    if rank0:
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    dist.barrier()
    errors["truncated"] = _load_error(worker, root_b)
    dist.barrier()
    if rank0:
        os.remove(victim)
    dist.barrier()
    errors["missing"] = _load_error(worker, root_b)
    errors["no_checkpoint"] = _load_error(worker, Path(root) / "nowhere")
    out["errors"] = errors
    out["victim"] = str(victim)
    return out


def _load_error(worker: PolicyWorker, path) -> str:
    try:
        worker.load(path)
    except Exception as e:  # the test asserts the type and message
        return f"{type(e).__name__}: {e}"
    return "no error"
