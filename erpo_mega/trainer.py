"""The RL loop: prompts -> rollout -> rewards -> log-probs/entropy -> advantages -> update -> sync.

The trainer is thin on purpose: each arrow is one call into a room (data, rollout,
rewards, megatron, algo, weights, observe). Every training rank runs this file. Rank 0
talks to the engines and broadcasts each rollout, so all ranks build the same batch and
the Megatron collectives (TP/PP/DP) line up; advantages are computed on the whole batch on
every rank before it is split, which makes them independent of the layout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from erpo_mega.algo.registry import get_advantage_estimator, get_policy_loss
from erpo_mega.config import save_yaml, to_dict
from erpo_mega.data.batcher import PromptBatcher
from erpo_mega.data.builtin_task import ArithmeticTask
from erpo_mega.data.datasets import load_prompts
from erpo_mega.data.prompts import encode_prompts
from erpo_mega.megatron.batching import PolicyBatch
from erpo_mega.megatron.worker import PolicyWorker
from erpo_mega.models.config import ModelConfig
from erpo_mega.observe.metrics import MetricsWriter, PhaseTimer
from erpo_mega.orchestration.engines import EnginePool
from erpo_mega.orchestration.eval_config import legacy_set_config
from erpo_mega.orchestration.evaluate import (
    EvalSet,
    entropy_temperature,
    generate_set,
    load_eval_set,
    print_eval_table,
    score_entropy,
    set_metrics,
    write_samples,
)
from erpo_mega.orchestration.rollout_step import Rollout, generate_rollout
from erpo_mega.orchestration.sft import sft_batch, sft_step
from erpo_mega.orchestration.step_guards import (
    RolloutProblem,
    check_rollout_logp_gap,
    drop_empty_responses,
    merge_update_metrics,
    minibatch_indices,
    rollout_logp_gap,
)
from erpo_mega.rewards.registry import get_reward_fn
from erpo_mega.rollout.client import EngineError
from erpo_mega.run_config import RunConfig, load_run_config
from erpo_mega.run_dir import (
    RunDirError,
    check_new_run,
    key_differences,
    pick_resume_checkpoint,
    prune_checkpoints,
    read_key,
    write_key,
)

log = logging.getLogger("erpo_mega.trainer")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops; the last checkpoint is left as it was."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    """Wait for rank 0 (disk writes, engine start-up) on the CPU wait group, not the NCCL one."""
    from erpo_mega.parallel.dist import wait_for_rank0

    wait_for_rank0()


def _broadcast(obj):
    """Rank 0's python object on every rank; the others wait on the CPU wait group, whose
    timeout (`train.parallel.rank0_wait_timeout_s`) covers a whole rollout or eval."""
    from erpo_mega.parallel.dist import broadcast_from_rank0

    return broadcast_from_rank0(obj)


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file())


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, checkpoint: str | None = None):
        self.cfg = cfg
        self.resume = resume or checkpoint is not None
        self.checkpoint = checkpoint  # a checkpoint root or iter dir; default: the run's own
        self.run_dir = Path(cfg.run_dir)
        self.rank = 0
        self.worker: PolicyWorker | None = None
        self.ref_worker: PolicyWorker | None = None
        self.engines: EnginePool | None = None
        self.colocate = None  # ColocatedMemory when rollout.colocate
        self.metrics: MetricsWriter | None = None
        self.step = 0
        self._gap_checked = False  # the engine/trainer log-prob check runs at this process's first RL step

    # ------------------------------------------------------------------ set-up ------------------
    def _setup_common(self) -> None:
        from erpo_mega.parallel.dist import init_distributed

        cfg = self.cfg
        par = cfg.train.parallel
        init_distributed(par.tp, par.pp, seed=par.seed, rank0_wait_s=par.rank0_wait_timeout_s)
        self.rank = _rank()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.run_dir / "config.yaml")
        _barrier()
        self.tokenizer = self._tokenizer()
        self.model_cfg, self.init_dir = self._model_source()
        _check_layout(self.model_cfg, cfg.train.parallel)  # before any data is read or model is built
        self.task = ArithmeticTask(cfg.data.builtin, seed=cfg.data.seed) if cfg.data.source == "builtin" else None
        reward = cfg.reward
        if reward == "auto":
            reward = "builtin" if cfg.data.source == "builtin" else "math_verify"
        self.reward_fn = get_reward_fn(reward)
        self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.tensorboard) if self.rank == 0 else None

    def _tokenizer(self):
        from erpo_mega.data.tokenizer import build_char_tokenizer, load_tokenizer

        spec = self.cfg.model.tokenizer
        if spec != "builtin":
            return load_tokenizer(spec)
        tok_dir = self.run_dir / "tokenizer"
        if self.rank == 0 and not (tok_dir / "tokenizer.json").is_file():
            build_char_tokenizer(tok_dir)
        _barrier()
        return load_tokenizer(tok_dir)

    def _model_source(self) -> tuple[ModelConfig, Path | None]:
        """The architecture, and a Megatron-format dir to load initial weights from (None: fresh)."""
        m = self.cfg.model
        if m.init_from is None:
            tok = self.tokenizer
            arch = to_dict(m.arch)
            arch.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
            arch.pop("head_dim", None) if m.arch.head_dim == m.arch.hidden_size // m.arch.num_attention_heads else None
            return ModelConfig.from_dict(arch, source="model.arch"), None
        src = Path(m.init_from)
        if not src.exists():
            raise FileNotFoundError(f"model.init_from: {src} does not exist")
        if _is_hf_dir(src):  # every rank streams its own TP/PP shards from it (models.hf_load)
            return ModelConfig.from_hf_dir(src), src
        from erpo_mega.models.convert import read_meta

        meta = read_meta(src)
        return ModelConfig.from_dict(meta["model_config"], source=str(src / "erpo_meta.json")), src

    def _new_worker(self, optim, init_from) -> PolicyWorker:
        return PolicyWorker().setup(self.model_cfg, self.cfg.train.parallel, optim, init_from=init_from,
                                    bf16=self.cfg.model.bf16, init_distributed_groups=False)

    def _load_data(self):
        cfg = self.cfg
        if self.task is not None:
            train_items = self.task.items("train", cfg.data.builtin_train_size)
        else:
            train_items = load_prompts(cfg.data, cfg.data.split).items
        train = encode_prompts(train_items, self.tokenizer, cfg.data)
        return train, self._load_eval_sets()

    def _load_eval_sets(self) -> list[EvalSet]:
        """`eval.sets`, or the legacy single split (one greedy sample per prompt, flat metric names)."""
        cfg = self.cfg
        if cfg.eval.sets:
            return [load_eval_set(name, s, cfg.data, self.tokenizer, self.task) for name, s in cfg.eval.sets.items()]
        ev = cfg.eval
        legacy = legacy_set_config(ev.split, ev.num_prompts, ev.temperature, ev.max_new_tokens)
        if self.task is not None:
            items = self.task.items(ev.split, min(ev.num_prompts, cfg.data.builtin_eval_size))
        else:
            items = load_prompts(cfg.data, ev.split).items[: ev.num_prompts]
        enc = encode_prompts(items, self.tokenizer, cfg.data)
        return [EvalSet("", legacy, enc.items, enc.input_ids, label=ev.split)]

    # ------------------------------------------------------------------ weights -> engines ------
    def _export(self):
        from erpo_mega.weights.export import iter_hf_weights

        self.worker.sync_params()  # overlap_param_gather leaves the DP gather to the next forward
        return iter_hf_weights(self.worker.model_chunks, self.model_cfg)

    def _export_hf_dir(self, out: Path) -> Path:
        """Write the current weights as a HuggingFace model dir (collective over training ranks)."""
        from erpo_mega.weights.transport import save_hf_safetensors

        named = self._export()
        if self.rank == 0:
            save_hf_safetensors(named, out)
            (out / "config.json").write_text(json.dumps(self.model_cfg.to_hf_dict(), indent=1))
            self.tokenizer.save_pretrained(out)
        else:
            for _ in named:
                pass
        _barrier()
        return out

    def _start_engines(self, fresh: bool) -> None:
        """Start (or connect to) the engines so they serve the policy's current weights.

        `fresh`: the weights are exactly the initial ones (no SFT, not resumed). Engines
        launched here start from the HF `model.init_from` when there is one (no export at
        start) and get the current weights pushed over the sync path when they differ;
        without an HF source they start from an export of the current weights. External
        engines were started from MODEL_DIR by someone else: anything else is pushed.
        """
        cfg = self.cfg
        hf_source = self.init_dir if self.init_dir is not None and _is_hf_dir(self.init_dir) else None
        start_dir, push = None, False
        if cfg.rollout.engine == "external":
            push = not (fresh and hf_source is not None)
        elif hf_source is not None:
            start_dir, push = hf_source, not fresh
        else:
            start_dir = self._export_hf_dir(self.run_dir / "engine_init")  # collective
        if self.rank == 0:
            self.engines = EnginePool(cfg.rollout, self.run_dir, cfg.seed).start(start_dir)
            if self.step and not push:  # started from an export of the restored weights
                for e in self.engines.engines:
                    e.update_weight_version(str(self.step))
        _barrier()  # the other ranks wait on the CPU group while rank 0 starts the engines
        if push:
            self._sync_weights(str(self.step))

    def _setup_colocation(self) -> None:
        """rollout.colocate: engines and trainer take turns with the accelerator memory."""
        from erpo_mega.orchestration.colocate import ColocatedMemory

        self.colocate = None
        if not self.cfg.rollout.colocate:
            return
        self.colocate = ColocatedMemory(self.worker, self.engines.engines if self.engines else None)
        self.colocate.start()

    def _resident(self):
        """The trainer's full state on the accelerator for the duration (colocated: caches released)."""
        import contextlib

        return self.colocate.trainer_resident() if self.colocate is not None else contextlib.nullcontext()

    def _sync_weights(self, version: str) -> dict:
        if self.cfg.rollout.sync_method == "distributed" and self.cfg.train.parallel.pp > 1:
            # every pipeline stage sends its own layers over its own group (engines.PipelineStageSync)
            if getattr(self, "_stage_sync", None) is None:
                from erpo_mega.orchestration.engines import PipelineStageSync

                self._stage_sync = PipelineStageSync(self.cfg.rollout)
            report = self._stage_sync.sync(self.worker.model_chunks, self.model_cfg, self.engines, version)
            return {"sync_bytes": float(report.bytes), "sync_seconds": report.seconds} if self.rank == 0 else {}
        named = self._export()
        if self.rank == 0:
            report = self.engines.sync(named, version)
            return {"sync_bytes": float(report.bytes), "sync_seconds": report.seconds}
        for _ in named:
            pass
        return {}

    # ------------------------------------------------------------------ phases -----------------
    def run_sft(self) -> Path | None:
        """Warm start; returns the checkpoint the RL policy starts from (None: nothing to do)."""
        cfg = self.cfg
        sft_root = self.run_dir / "sft"
        if cfg.sft.steps == 0:
            return None
        if (sft_root / "latest").is_file():  # finished before (resume)
            _check_sft_cache(sft_root, self._sft_key())
            return sft_root
        if self.resume and self.metrics:  # an SFT killed before it finished: its rows are redone
            self.metrics.close()
            self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.tensorboard, resume_step=0,
                                         resume_splits=("sft",))
        if self.task is None:
            raise ValueError("sft.steps > 0 needs data.source=builtin (SFT on external data is not wired yet)")
        worker = self._new_worker(cfg.sft.optim, self.init_dir)
        progress = _Progress(cfg.sft.steps, "SFT", enabled=cfg.progress and self.rank == 0)
        try:
            for step in range(cfg.sft.steps):
                batch = sft_batch(self.task, self.tokenizer, cfg.data, step, cfg.sft.batch_size, cfg.sft.noise,
                                  cfg.sft.redundancy, cfg.seed)
                t0 = time.perf_counter()
                m = sft_step(worker, batch)
                _check_finite(m, f"SFT step {step + 1}", None)
                m["time/train"] = time.perf_counter() - t0
                if self.metrics:
                    self.metrics.log(step + 1, m, split="sft")
                progress.update(step + 1, f"nll {m.get('nll', m.get('loss', float('nan'))):.3f}")
        finally:
            progress.close()
        worker.save(sft_root, extra={"phase": "sft"})
        if self.rank == 0:
            write_key(sft_root, self._sft_key())
        del worker
        return sft_root

    def _sft_key(self) -> dict:
        """Everything the SFT warm start's result depends on (its cache key)."""
        cfg = self.cfg
        return {"kind": "sft", "sft": to_dict(cfg.sft), "model": to_dict(cfg.model), "data": to_dict(cfg.data),
                "seed": cfg.seed}

    def _rollout(self, step: int, batcher: PromptBatcher, train) -> Rollout:
        cfg = self.cfg.rollout
        pb = batcher.next_batch()
        prompt_ids = [train.input_ids[i] for i in pb.indices]
        return generate_rollout(self.engines.generate_client, pb, prompt_ids, self.tokenizer, self.reward_fn,
                                run_seed=self.cfg.seed, step=step, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                concurrency=cfg.max_concurrency)

    def _policy_batch(self, ro: dict) -> PolicyBatch:
        width = max(len(r) for r in ro["response_ids"])
        loss_mask = None
        if self.cfg.rollout.drop_truncated and any(ro["truncated"]):
            lens = torch.tensor([len(r) for r in ro["response_ids"]])
            loss_mask = torch.arange(width)[None, :] < lens[:, None]
            loss_mask &= ~torch.tensor(ro["truncated"])[:, None]
        return PolicyBatch(prompt_ids=ro["prompt_ids"], response_ids=ro["response_ids"],
                           rollout_logp=_pad(ro["rollout_logp"], width), loss_mask=loss_mask)

    def rl_step(self, step: int, batcher: PromptBatcher, train) -> dict:
        cfg = self.cfg
        timer = PhaseTimer()
        with timer.phase("rollout"):
            ro = None
            if self.rank == 0:
                r = self._rollout(step, batcher, train)
                ro = dict(prompt_ids=r.prompt_ids, response_ids=r.response_ids, rollout_logp=r.rollout_logp,
                          rewards=r.rewards, group_ids=r.group_ids, truncated=r.truncated,
                          weight_version=_version_number(r.weight_versions))
            ro = _broadcast(ro)
        if self.colocate is not None:
            self.colocate.for_training()  # engines release their memory, the trainer onloads
        ro, n_empty, n_dropped = drop_empty_responses(ro)  # nothing to score or train in an empty response
        if not ro["response_ids"]:
            raise RolloutProblem(f"RL step {step + 1}: no prompt has two non-empty responses ({n_empty} empty); "
                                 "the engine generated nothing to train on (see its log under run_dir/engines/)")
        batch = self._policy_batch(ro)
        mask = batch.response_mask()
        n_tokens = int(mask.sum())
        with timer.phase("logprob"):
            old_logp, entropy = self.worker.compute_logprobs(batch, temperature=cfg.rollout.temperature)
            batch.old_logp = old_logp
            if not self._gap_checked:
                self._gap_checked = True
                gap = rollout_logp_gap(old_logp, batch.rollout_logp, mask)
                check_rollout_logp_gap(gap, cfg.rollout.max_logp_gap, cfg.rollout.temperature, step + 1)
            if self.ref_worker is not None:
                batch.ref_logp, _ = self.ref_worker.compute_logprobs(batch, temperature=cfg.rollout.temperature)
        rewards = torch.tensor(ro["rewards"], dtype=torch.float32)
        group_ids = torch.tensor(ro["group_ids"])
        estimator = get_advantage_estimator(cfg.algo.advantage)
        advantages, adv_stats = estimator(rewards, entropy, mask, group_ids, cfg.algo.erpo)
        batch.advantages = advantages.float()
        loss_fn = get_policy_loss(cfg.algo.policy_loss)
        with timer.phase("train"):
            train_metrics = self._update(batch, loss_fn)
            train_metrics.pop("step", None)
            train_metrics["optimizer_step"] = float(self.worker.step)
        _check_finite(train_metrics, f"RL step {step + 1}", self._last_checkpoint())
        with timer.phase("sync"):
            if self.colocate is not None:
                self.colocate.for_sync()
            sync = self._sync_weights(str(step + 1))
            if self.colocate is not None:
                self.colocate.after_sync()
        lens = [len(r) for r in ro["response_ids"]]
        out = {
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards >= 1.0).float().mean()),
            "response_len_mean": sum(lens) / len(lens),
            "truncated_fraction": sum(ro["truncated"]) / len(lens),
            "empty_responses": float(n_empty),
            "samples_dropped": float(n_dropped),
            "rollout_weight_version": ro["weight_version"],
            **{k: v for k, v in adv_stats.items() if isinstance(v, (int, float))},
            **train_metrics,
            **sync,
            **timer.metrics({"rollout": n_tokens, "logprob": n_tokens, "train": n_tokens}),
        }
        out["clip_frac"] = out.get("clip_frac_low", 0.0) + out.get("clip_frac_high", 0.0)
        return out

    def _update(self, batch: PolicyBatch, loss_fn) -> dict:
        """`updates_per_step` optimizer steps on disjoint, non-empty mini-batches of whole samples.

        A mini-batch with no token in the loss (all its responses truncated under
        `drop_truncated`) is skipped and counted in `updates_skipped`, not an error.
        """
        k = self.cfg.algo.updates_per_step
        per_update, skipped = [], 0
        for idx in minibatch_indices(batch.num_samples, min(k, batch.num_samples)):
            sub = batch if k == 1 else _select(batch, idx)
            if not bool(sub.effective_loss_mask().any()):
                skipped += 1
                continue
            per_update.append(self.worker.train_step(sub, self.cfg.algo.loss,
                                                     temperature=self.cfg.rollout.temperature, loss_fn=loss_fn))
        return merge_update_metrics(per_update, skipped)

    def _last_checkpoint(self) -> str | None:
        latest = self.run_dir / "checkpoints" / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def _save(self, batcher: PromptBatcher) -> None:
        extra = {"step": self.step, "batcher": batcher.state_dict()}
        with self._resident():
            self.worker.save(self.run_dir / "checkpoints", extra=extra)
        if self.rank == 0:
            prune_checkpoints(self.run_dir / "checkpoints", self.cfg.checkpoint.keep_last)

    def _eval(self, eval_sets: list[EvalSet], step: int) -> dict | None:
        """Sample every set on rank 0; with eval.entropy every rank scores the responses (collective)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        rollouts = None
        if self.rank == 0:
            # "auto" scores builtin items with the task's checker and everything else with math-verify
            reward_fn = get_reward_fn("math_verify") if cfg.reward == "auto" else self.reward_fn
            rollouts = [generate_set(self.engines.generate_client, es, self.tokenizer, reward_fn, run_seed=cfg.seed,
                                     step=step, default_max_new_tokens=cfg.rollout.max_new_tokens,
                                     concurrency=cfg.rollout.max_concurrency) for es in eval_sets]
        entropy: list[dict] = []
        if cfg.eval.entropy:
            shared = _broadcast(None if rollouts is None else
                                [(r.prompt_ids, r.response_ids, r.group_ids) for r in rollouts])
            with self._resident():  # colocated: the trainer scores while the engines' caches are released
                entropy = [score_entropy(self.worker, p, r, g, entropy_temperature(es.cfg), cfg.algo.erpo)
                           for es, (p, r, g) in zip(eval_sets, shared)]
        if self.rank != 0:
            return None
        m: dict[str, float] = {}
        for i, (es, ro) in enumerate(zip(eval_sets, rollouts)):
            m.update(set_metrics(es, ro))
            if entropy:
                m.update({es.key(k): v for k, v in entropy[i].items()})
        m["time/eval"] = time.perf_counter() - t0
        self.metrics.log(step, m, split="eval")
        if cfg.eval.save_samples:
            write_samples(self.run_dir / "eval_samples" / f"step_{step:06d}.jsonl", eval_sets, rollouts)
        return m

    # ------------------------------------------------------------------ entry points -----------
    def train(self, mode: str = "train") -> dict:
        cfg = self.cfg
        if mode != "eval":  # before anything is written: a new run never lands on an old one
            check_new_run(self.run_dir, self.resume)
        self._setup_common()
        try:
            train, eval_sets = self._load_data()  # bad data fails here, before any model is built
            start_dir = self.run_sft()
            if mode == "sft":
                return {"sft_checkpoint": str(start_dir) if start_dir else None}
            init = start_dir or self.init_dir
            self.worker = self._new_worker(cfg.train.optim, init)
            if cfg.algo.loss.kl_coef > 0:
                self.ref_worker = self._new_worker(cfg.train.optim, init)
            batcher = PromptBatcher(train.items, cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt,
                                    seed=cfg.seed)
            ckpt_root = Path(self.checkpoint) if self.checkpoint else self.run_dir / "checkpoints"
            if self.checkpoint and not ckpt_root.exists():
                raise FileNotFoundError(f"--checkpoint: {ckpt_root} does not exist")
            if self.resume and ((ckpt_root / "latest").is_file() or self.checkpoint):
                extra = self.worker.load(ckpt_root if self.checkpoint else
                                         pick_resume_checkpoint(ckpt_root, cfg.checkpoint.resume_fallback))
                self.step = int(extra["step"])
                batcher.load_state_dict(extra["batcher"])
                if self.metrics and mode == "train":  # drop rows the resumed run will redo
                    self.metrics.close()
                    self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.tensorboard, resume_step=self.step)
            elif self.resume and self.rank == 0:
                log.warning("--resume: no checkpoint under %s; starting from step 0", ckpt_root)
                if self.metrics and mode == "train":  # RL rows of the killed attempt are all redone
                    self.metrics.close()
                    self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.tensorboard, resume_step=-1)
            self._start_engines(fresh=self.step == 0 and start_dir is None)
            self._setup_colocation()
            if self.step == 0 and mode == "train":
                self._eval(eval_sets, 0)
            if mode == "eval":
                return self._eval(eval_sets, self.step) or {}
            progress = _Progress(cfg.train.steps, "RL", enabled=cfg.progress and self.rank == 0, done=self.step)
            last = {}
            try:
                while self.step < cfg.train.steps:
                    m = self.rl_step(self.step, batcher, train)
                    self.step += 1
                    if self.metrics:
                        self.metrics.log(self.step, m)
                    last = m
                    progress.update(self.step, f"reward {m['reward_mean']:.3f} len {m['response_len_mean']:.1f} "
                                               f"H {m.get('entropy_mean', float('nan')):.3f}")
                    if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                        self._eval(eval_sets, self.step)
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self._save(batcher)
            finally:
                progress.close()
            final = self._eval(eval_sets, self.step)
            if not (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self._save(batcher)
            with self._resident():
                self._export_hf_dir(self.run_dir / "final_hf")  # the trained policy, loadable by transformers
            summary = {"step": self.step, "final_eval": final, "last_train": last}
            if self.rank == 0:
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
            return summary
        except EngineError as e:  # an engine died or stopped answering: name it and stop, no traceback
            if self.engines is None:
                raise RolloutProblem(f"starting the rollout engines failed: {e}") from None
            detail = self.engines.describe_failure(e)
            last = self._last_checkpoint()
            kept = f"the last checkpoint ({last}) is intact, continue with --resume" if last else \
                "no checkpoint had been written yet"
            raise RolloutProblem(f"a rollout engine failed at RL step {self.step + 1}: {detail}; {kept}") from None
        finally:
            self.close()

    def close(self) -> None:
        if getattr(self, "_stage_sync", None) is not None:
            self._stage_sync.close()
            self._stage_sync = None
        if self.engines is not None:
            self.engines.close()
            self.engines = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def _select(batch: PolicyBatch, idx: list[int]) -> PolicyBatch:
    width = max(len(batch.response_ids[i]) for i in idx)

    def rows(t):
        return None if t is None else t[idx, :width]

    return PolicyBatch(prompt_ids=[batch.prompt_ids[i] for i in idx],
                       response_ids=[batch.response_ids[i] for i in idx],
                       advantages=rows(batch.advantages), old_logp=rows(batch.old_logp),
                       ref_logp=rows(batch.ref_logp), rollout_logp=rows(batch.rollout_logp),
                       loss_mask=rows(batch.loss_mask))


def _version_number(versions: list[str | None]) -> float:
    """The engines' weight version behind a rollout (-1 if unknown or mixed)."""
    uniq = set(versions)
    if len(uniq) != 1:
        return -1.0
    try:
        return float(next(iter(uniq)))
    except (TypeError, ValueError):
        return -1.0


def _check_finite(metrics: dict, where: str, last_checkpoint: str | None) -> None:
    bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])]
    if bad:
        ck = f"; the last checkpoint ({last_checkpoint}) is intact" if last_checkpoint else \
            "; no checkpoint had been written yet"
        raise TrainingDiverged(f"{where}: non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)}; "
                               f"stopping before the broken weights are saved or synced{ck}")


def _check_layout(model_cfg: ModelConfig, par) -> None:
    """The model splits over train.parallel.tp x pp (heads, groups, FFN, vocab, layers), or a ConfigError."""
    from erpo_mega.config import ConfigError
    from erpo_mega.models.hf_tables import validate_parallel_layout

    try:
        validate_parallel_layout(model_cfg, par.tp, par.pp)
    except ConfigError as e:
        raise ConfigError("train.parallel.tp" if e.key != "num_layers" else "train.parallel.pp",
                          f"the model cannot be split this way: {e.key} {str(e).split(': ', 1)[-1]}") from None


def _check_sft_cache(sft_root: Path, key: dict) -> None:
    """A finished SFT warm start is reused only for the config it was trained with."""
    old = read_key(sft_root)
    if old is None:  # written before keys existed: nothing to compare against
        log.warning("%s has no record of the config it was trained with; reusing it", sft_root)
        return
    diff = key_differences(old, key)
    if diff:
        changed = []
        for section in diff:
            a, b = old.get(section), key.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                changed += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                            if a.get(k) != b.get(k)]
            else:
                changed.append(f"{section}: {a!r} -> {b!r}")
        raise RunDirError(f"{sft_root} holds an SFT warm start trained with another config ({'; '.join(changed)}); "
                          f"nothing was changed. Restore those values, delete {sft_root} to redo the warm "
                          "start, or choose another run_dir")


class _Progress:
    """A rich progress bar on rank 0 (a plain line per step when not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True, done: int = 0):
        self.bar = None
        self.enabled = enabled
        self.label = label
        self.total = total
        if enabled and os.isatty(1):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.description}"))
            self.task = self.bar.add_task("", total=total, completed=done)
            self.bar.start()

    def update(self, done: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, description=text)
        elif self.enabled:
            print(f"[{self.label} {done}/{self.total}] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def run_from_cli(config_path: str, overrides: list[str] | None, mode: str = "train", resume: bool = False,
                 checkpoint: str | None = None) -> int:
    logging.basicConfig(level=os.environ.get("ERPO_LOG_LEVEL", "WARNING"))
    from erpo_mega.config import ConfigError
    from erpo_mega.data.types import DataError
    from erpo_mega.megatron.checkpoint import CheckpointError
    from erpo_mega.models.hf_io import ConversionError

    try:
        cfg = load_run_config(config_path, overrides)
    except ConfigError as e:
        print(f"erpo-mega: error: {e}", file=sys.stderr, flush=True)
        return 2
    trainer = Trainer(cfg, resume=resume or mode == "eval", checkpoint=checkpoint)
    try:
        result = trainer.train(mode=mode)
    except (TrainingDiverged, RolloutProblem) as e:
        print(f"erpo-mega: training stopped: {e}", flush=True)
        return 1
    except (ConfigError, DataError, FileNotFoundError, RunDirError, CheckpointError, ConversionError) as e:
        print(f"erpo-mega: error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # a full disk anywhere else (exports, metrics, engine weights): one sentence
        import errno

        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            raise
        print(f"erpo-mega: error: no space left on device ({errno.errorcode[e.errno]}) writing "
              f"{e.filename or 'a file'} under {cfg.run_dir}; checkpoints already written are intact. Free "
              "space or point run_dir elsewhere, then --resume", file=sys.stderr, flush=True)
        return 2
    if _rank() == 0:
        if mode == "eval" and result:
            print_eval_table(result, title=f"evaluation of {cfg.run_dir}", default_label=cfg.eval.split)
        print(json.dumps(result, indent=1, default=float))
    from erpo_mega.parallel.dist import destroy_distributed

    destroy_distributed()
    return 0
