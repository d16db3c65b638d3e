"""`PolicyWorker`: the one object the trainer drives on every training rank.

It owns the megatron policy (model stage, DDP, optimizer, LR schedule) and offers the RL
step's operations in batch layout: log-probs/entropies for a `PolicyBatch`, one training
step, save and load. Every method is collective over all training ranks; every rank passes
the same full batch and gets the same full results back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from erpo_mega.algo.config import LossConfig
from erpo_mega.algo.loss import policy_loss
from erpo_mega.megatron import checkpoint as ckpt
from erpo_mega.megatron.batching import PolicyBatch
from erpo_mega.megatron.config import OptimConfig, ParallelConfig
from erpo_mega.megatron.logprob import compute_logprobs
from erpo_mega.megatron.setup import PolicyModules, build_policy
from erpo_mega.megatron.train_step import train_step
from erpo_mega.models.config import ModelConfig


class PolicyWorker:
    def __init__(self) -> None:
        self.modules: PolicyModules | None = None
        self.model_cfg: ModelConfig | None = None
        self.parallel: ParallelConfig | None = None
        self.step = 0
        self.offloaded: set[str] = set()  # of "params", "grads", "optimizer" (colocated placement)

    # ------------------------------------------------------------------ lifecycle ---------------
    def setup(self, model_cfg: ModelConfig, parallel: ParallelConfig, optim: OptimConfig,
              init_from: str | Path | None = None, bf16: bool | None = None,
              init_distributed_groups: bool = True) -> PolicyWorker:
        """Initialise process groups (unless the caller did), build the policy, and load
        initial weights if given: an HF safetensors directory (streamed into this rank's
        TP/PP shards), a converted megatron directory or a training checkpoint. Weights are
        loaded before the optimizer is built, so its fp32 main copy starts from them."""
        if init_distributed_groups:
            from erpo_mega.parallel.dist import init_distributed

            init_distributed(parallel.tp, parallel.pp, seed=parallel.seed)
        self.model_cfg, self.parallel = model_cfg, parallel
        load = None if init_from is None else (lambda chunks: load_initial_weights(init_from, chunks, model_cfg))
        self.modules = build_policy(model_cfg, parallel, optim, bf16=bf16, load_weights=load)
        self.step = 0
        return self

    @property
    def model_chunks(self) -> list:
        if self.modules is not None and "params" in self.offloaded:
            raise RuntimeError("PolicyWorker: parameters are offloaded; call onload() first")
        return self._need(resident=False).model_chunks

    def _need(self, resident: bool = True) -> PolicyModules:
        if self.modules is None:
            raise RuntimeError("PolicyWorker.setup() has not been called")
        if resident and self.offloaded:
            raise RuntimeError(f"PolicyWorker: {sorted(self.offloaded)} are offloaded; call onload() first")
        return self.modules

    # ------------------------------------------------------------------ colocated memory ---------
    def offload(self, params: bool = True, grads: bool = True, optimizer: bool = True) -> None:
        """Free the accelerator memory of this rank's training state while engines generate.

        Uses megatron's own RL offload paths: optimizer state and fp32 main params to host
        memory, DDP grad buffers freed, bf16 param buffers copied to pinned host memory. On
        a CPU-only machine there is nothing to free; the state is still tracked, so using an
        offloaded worker fails loudly everywhere.
        """
        m = self._need(resident=False)
        what = {k for k, on in (("params", params), ("grads", grads), ("optimizer", optimizer)) if on}
        what -= self.offloaded
        if not what:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            if "optimizer" in what:
                m.optimizer.offload_to_cpu()
            for chunk in m.model_chunks:
                for buf in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
                    buf.offload_to_cpu(move_params="params" in what, move_grads="grads" in what)
            torch.cuda.empty_cache()
        self.offloaded |= what

    def onload(self) -> None:
        """Bring back everything `offload` moved (grad buffers come back zeroed)."""
        m = self._need(resident=False)
        if not self.offloaded:
            return
        if torch.cuda.is_available():
            for chunk in m.model_chunks:
                for buf in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
                    buf.reload_from_cpu(move_params="params" in self.offloaded, move_grads="grads" in self.offloaded)
            if "optimizer" in self.offloaded:
                m.optimizer.restore_from_cpu()
            torch.cuda.synchronize()
        self.offloaded.clear()

    # ------------------------------------------------------------------ RL operations -----------
    def compute_logprobs(self, batch: PolicyBatch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies), fp32 [N, T], of the current weights; no gradients."""
        m = self._need()
        return compute_logprobs(m.model_chunks, batch, vocab_size=self.model_cfg.vocab_size,
                                micro_batch_tokens=self.parallel.micro_batch_tokens, temperature=temperature,
                                pad_multiple=self.parallel.pad_multiple)

    def train_step(self, batch: PolicyBatch, loss_cfg: LossConfig, temperature: float = 1.0,
                   loss_fn: Callable = policy_loss) -> dict[str, float]:
        """One optimizer step; `loss_fn` has the policy-loss signature (e.g. `sft_nll_loss`)."""
        m = self._need()
        metrics = train_step(m.model_chunks, m.optimizer, m.scheduler, batch, loss_cfg, loss_fn=loss_fn,
                             vocab_size=self.model_cfg.vocab_size,
                             micro_batch_tokens=self.parallel.micro_batch_tokens, temperature=temperature,
                             pad_multiple=self.parallel.pad_multiple)
        self.step += 1
        metrics["step"] = float(self.step)
        return metrics

    def sync_params(self) -> None:
        """Complete the DP all-gather of updated parameters now.

        With `overlap_param_gather` the optimizer step leaves each DP rank with only its own
        shard updated; the gather runs in the next forward's pre-hooks. Anything that reads
        parameters without a forward (weight export to engines, checkpoints) calls this first.
        """
        chunks = self.model_chunks  # needs resident parameters only
        if self.parallel is not None and self.parallel.overlap_param_gather:
            for chunk in chunks:
                chunk.start_param_sync(force_sync=True)

    # ------------------------------------------------------------------ checkpoints -------------
    def save(self, root: str | Path, extra: dict | None = None, optim_format: str = ckpt.DEFAULT_OPTIM_FORMAT) -> Path:
        """Checkpoint under `root`; `optim_format` "sharded" (routine) or "reshardable" (any TP/PP)."""
        from erpo_mega.models.convert import write_meta

        cfg = self.model_cfg
        self.sync_params()
        return ckpt.save_checkpoint(root, self._need(), self.step, extra,
                                    write_extra_files=lambda d: write_meta(d, cfg, "erpo-mega training", kind="train"),
                                    optim_format=optim_format)

    def load(self, path: str | Path, load_optimizer: bool = True) -> dict:
        """Resume from a checkpoint root or iter directory (any TP/PP/DP); returns `extra`."""
        m = self._need()
        state = ckpt.load_checkpoint(path, m, load_optimizer=load_optimizer)
        if not load_optimizer:  # the main (fp32) copy still holds the weights from before the load
            m.optimizer.reload_model_params()
        self.step = int(state["step"])
        return state["extra"]


def load_initial_weights(path: str | Path, model_chunks: list, model_cfg: ModelConfig | None = None) -> None:
    """Initial weights from an HF directory (streamed per rank) or a megatron checkpoint."""
    from erpo_mega.models.hf_load import is_hf_dir, load_hf_into

    if is_hf_dir(path):
        load_hf_into(model_chunks, path, model_cfg)
    else:
        ckpt.load_weights_only(path, model_chunks)
