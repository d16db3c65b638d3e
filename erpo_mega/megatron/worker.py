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
        return self._need().model_chunks

    def _need(self) -> PolicyModules:
        if self.modules is None:
            raise RuntimeError("PolicyWorker.setup() has not been called")
        return self.modules

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

    # ------------------------------------------------------------------ checkpoints -------------
    def save(self, root: str | Path, extra: dict | None = None) -> Path:
        from erpo_mega.models.convert import write_meta

        cfg = self.model_cfg
        return ckpt.save_checkpoint(root, self._need(), self.step, extra,
                                    write_extra_files=lambda d: write_meta(d, cfg, "erpo-mega training", kind="train"))

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
