"""The timed loop: the trainer's own RL step on synthetic prompts with forced response lengths.

`BenchTrainer` is the `Trainer` with two things swapped: where the architecture comes from
(a named shape or a checkpoint's config, weights left at random init when `bench.random_init`)
and what the rollout asks for (random prompt ids of `bench.prompt_len`, every response forced
to `bench.response_len` with `ignore_eos`, rewards drawn from a seeded coin so advantages are
not all zero). Everything else (engines, log-prob pass, advantages, update, weight sync) is
`Trainer.rl_step`, unchanged, so what is measured is what `train` runs.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from erpo_mega.bench import flops as F
from erpo_mega.bench.memory import current_rss_bytes, rank_memory
from erpo_mega.bench.nvml import NvmlSampler
from erpo_mega.bench.peaks import device_name, resolve_peak
from erpo_mega.data.batcher import PromptBatcher
from erpo_mega.data.types import PromptItem
from erpo_mega.models.config import ModelConfig
from erpo_mega.orchestration.engines import EnginePool
from erpo_mega.orchestration.rollout_step import Rollout, generate_rollout
from erpo_mega.trainer import Trainer, _barrier, _is_hf_dir

PHASES = ("rollout", "logprob", "train", "sync")


class _CoinReward:
    """Seeded 0/1 rewards: groups get mixed outcomes, so every phase does its real work."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def batch(self, items, texts):
        return [float(self.rng.random() < 0.5) for _ in texts]


class _IdsText:
    """Stands in for the tokenizer's decode: synthetic ids need no text."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


class BenchTrainer(Trainer):
    def __init__(self, cfg, peak_tflops: float | None = None):
        super().__init__(cfg)
        self.peak_override = peak_tflops
        self.rollouts: list[Rollout] = []

    # ----------------------------------------------------------------- what is built ----------
    def _model_source(self) -> tuple[ModelConfig, Path | None]:
        b, m = self.cfg.bench, self.cfg.model
        if b.model:
            from erpo_mega.bench.shapes import model_config

            need = b.prompt_len + b.response_len
            return model_config(b.model, max_position_embeddings=max(4096, need)), None
        if not b.random_init or m.init_from is None:
            return super()._model_source()
        src = Path(m.init_from)
        if not src.exists():
            raise FileNotFoundError(f"model.init_from: {src} does not exist")
        if _is_hf_dir(src):
            return ModelConfig.from_hf_dir(src), None
        from erpo_mega.models.convert import read_meta

        return ModelConfig.from_dict(read_meta(src)["model_config"], source=str(src / "erpo_meta.json")), None

    def _synthetic_prompts(self, n: int) -> list[list[int]]:
        cfg, b = self.model_cfg, self.cfg.bench
        special = {cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id}
        low = 8 if cfg.vocab_size > 64 else 0
        pool = [i for i in range(low, min(cfg.vocab_size, low + 50000)) if i not in special]
        rng = random.Random(self.cfg.seed)
        return [[rng.choice(pool) for _ in range(b.prompt_len)] for _ in range(n)]

    def _rollout(self, step: int, batcher: PromptBatcher, train) -> Rollout:
        cfg, b = self.cfg.rollout, self.cfg.bench
        pb = batcher.next_batch()
        prompt_ids = [train.input_ids[i] for i in pb.indices]
        if b.only == "train":
            r = self._synthetic_rollout(pb, prompt_ids, step)
            self.rollouts.append(r)
            return r
        r = generate_rollout(self.engines.generate_client, pb, prompt_ids, _IdsText(), self._reward,
                             run_seed=self.cfg.seed, step=step, max_new_tokens=b.response_len,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             concurrency=cfg.max_concurrency, extra_sampling={"ignore_eos": True})
        self.rollouts.append(r)
        return r

    def _synthetic_rollout(self, pb, prompt_ids, step: int) -> Rollout:
        """Train-only runs: random response ids of the forced length instead of an engine's."""
        n, rl = len(pb.expanded()), self.cfg.bench.response_len
        rng = random.Random(self.cfg.seed * 1000003 + step)
        pool = self._synthetic_prompts(1)[0]
        expanded = pb.expanded()
        return Rollout(items=[it for _, it in expanded], group_ids=[g for g, _ in expanded],
                       prompt_ids=[prompt_ids[g] for g, _ in expanded],
                       response_ids=[[rng.choice(pool) for _ in range(rl)] for _ in range(n)],
                       rollout_logp=[[0.0] * rl for _ in range(n)], texts=[""] * n,
                       rewards=self._reward.batch(None, [""] * n), truncated=[False] * n, weight_versions=[None] * n)

    def _sync_weights(self, version: str) -> dict:
        if self.cfg.bench.only == "train":  # no engines to update
            return {}
        return super()._sync_weights(version)

    def _rollout_only_step(self, step: int, batcher: PromptBatcher, train) -> dict:
        t0 = time.perf_counter()
        if self.rank == 0:
            self._rollout(step, batcher, train)
        return {"time/rollout": time.perf_counter() - t0}

    # ----------------------------------------------------------------- the run -----------------
    def bench(self, steps: int, warmup: int) -> dict | None:
        """Run warmup + steps RL steps; rank 0 returns the raw measurements, others None."""
        cfg = self.cfg
        self._setup_common()
        self._reward = _CoinReward(cfg.seed)
        sampler = NvmlSampler(enabled=int(os.environ.get("LOCAL_RANK", "0")) == 0)  # one per node
        try:
            n_prompts = cfg.rollout.prompts_per_step * (steps + warmup)
            items = [PromptItem(prompt=f"synthetic {i}", answer="") for i in range(n_prompts)]
            train = SimpleNamespace(input_ids=self._synthetic_prompts(n_prompts))
            batcher = PromptBatcher(items, cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt,
                                    seed=cfg.seed, shuffle=False)
            rss0 = current_rss_bytes()
            t_setup = time.perf_counter()
            self.worker = self._new_worker(cfg.train.optim, self.init_dir)
            if cfg.algo.loss.kl_coef > 0:
                self.ref_worker = self._new_worker(cfg.train.optim, self.init_dir)
            only = cfg.bench.only
            if cfg.rollout.engine != "external" and only != "train":
                engine_dir = self._export_hf_dir(self.run_dir / "engine_init")
            if self.rank == 0 and only != "train":
                self.engines = EnginePool(cfg.rollout, self.run_dir, cfg.seed).start(
                    engine_dir if cfg.rollout.engine != "external" else None)
            if only == "train":
                self._gap_checked = True  # synthetic responses carry no engine log-probs to compare
            if cfg.rollout.engine == "external" and only != "train":
                # Engines started by the launcher serve their own model dir; the trainer's random
                # init differs, so push it once (untimed) before the first step, as a resumed run
                # would: rollouts then come from the weights the trainer scores.
                self._sync_weights("0")
            setup_s = time.perf_counter() - t_setup
            records = []
            with sampler:
                for i in range(warmup + steps):
                    _barrier()  # every rank starts the step together: step time is the slowest rank's
                    t0 = time.perf_counter()
                    if only == "rollout":
                        m = self._rollout_only_step(i, batcher, train)
                    else:
                        m = self.rl_step(i, batcher, train)
                    step_s = time.perf_counter() - t0
                    self.step += 1
                    if self.metrics:
                        self.metrics.log(self.step, {**m, "time/step": step_s, "warmup": float(i < warmup)},
                                         split="bench")
                    records.append({"step": i + 1, "warmup": i < warmup, "step_seconds": step_s, "metrics": m})
            memory = _gather(rank_memory(self.rank, rss0))
            nvml = _gather(sampler.summary())
            if self.rank != 0:
                return None
            bf16 = self.cfg.model.bf16 if self.cfg.model.bf16 is not None else torch.cuda.is_available()
            name = device_name()
            peak, peak_source = resolve_peak(self.peak_override, name, bf16)
            return {"records": records, "rollouts": self.rollouts, "memory": memory,
                    "nvml": [n for n in nvml if n] or None, "setup_seconds": setup_s,
                    "device": {"name": name, "bf16": bf16, "peak_tflops": peak, "peak_source": peak_source},
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "engine_memory": self._engine_memory()}
        finally:
            self.close()

    def _engine_memory(self) -> list[dict]:
        """RSS of engine processes this trainer started (their GPU memory is in `nvml`)."""
        out = []
        if self.engines is None:
            return out
        try:
            import psutil
        except ImportError:
            return out
        for i, h in enumerate(self.engines.handles):
            try:
                proc = psutil.Process(h.process.pid)
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                continue
            out.append({"engine": i, "url": h.url, "rss_bytes": int(rss)})
        return out


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def layout_of(cfg, world_size: int) -> dict:
    """Nodes, devices and how they are split between training and rollout."""
    ro, b, par = cfg.rollout, cfg.bench, cfg.train.parallel
    engines = len(ro.engine_urls) if ro.engine == "external" else ro.num_engines
    engine_devices = b.engine_devices or engines * ro.engine_tp
    placement = b.placement
    if placement == "auto":
        placement = "disaggregated" if ro.engine == "external" else "colocated"
    nodes = b.nodes or int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    devices = world_size + engine_devices if placement == "disaggregated" else max(world_size, engine_devices)
    return {"nodes": nodes, "devices": devices, "train_devices": world_size, "engine_devices": engine_devices,
            "tp": par.tp, "pp": par.pp, "dp": world_size // (par.tp * par.pp), "engines": engines,
            "engine": ro.engine, "engine_tp": ro.engine_tp, "placement": placement,
            "sync_method": ro.sync_method, "bucket_mb": ro.bucket_mb,
            "device_kind": "gpu" if torch.cuda.is_available() else "cpu-process"}


def summarize(cfg, model_cfg: ModelConfig, raw: dict, steps: int, warmup: int) -> dict:
    """bench.json: per-phase means over the timed steps, FLOPs, MFU, bytes, memory, layout."""
    timed = [r for r in raw["records"] if not r["warmup"]]
    rollouts = raw["rollouts"][warmup:]
    lay = layout_of(cfg, raw["world_size"])
    n = len(timed)

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    seq_lens = [[len(p) + len(r) for p, r in zip(ro.prompt_ids, ro.response_ids)] for ro in rollouts]
    resp_tokens = mean([sum(len(r) for r in ro.response_ids) for ro in rollouts])
    all_tokens = mean([sum(s) for s in seq_lens])
    fwd = mean([F.batch_flops_fwd(model_cfg, s) for s in seq_lens])
    logprob_passes = 2 if cfg.algo.loss.kl_coef > 0 else 1
    dev = raw["device"]
    peak = dev["peak_tflops"]
    secs = {p: mean([r["metrics"].get(f"time/{p}", 0.0) for r in timed]) for p in PHASES}
    step_s = mean([r["step_seconds"] for r in timed])
    tokens = {"rollout": resp_tokens, "logprob": all_tokens * logprob_passes, "train": all_tokens, "sync": 0.0}
    per_dev = {"rollout": lay["engine_devices"], "logprob": lay["train_devices"], "train": lay["train_devices"],
               "sync": lay["train_devices"]}
    phase_flops = {"rollout": fwd, "logprob": fwd * logprob_passes, "train": 3 * fwd, "sync": 0.0}
    only = cfg.bench.only
    active = {"rollout": ("rollout",), "train": ("logprob", "train")}.get(only, PHASES)
    for p in PHASES:
        if p not in active:  # a component run: the phase did not run (train-only: its synthetic
            secs[p], tokens[p], phase_flops[p] = 0.0, 0.0, 0.0  # rollout is counted as overhead)
    phases = {}
    for p in PHASES:
        s = secs[p]
        tps = tokens[p] / s if s > 0 else 0.0
        phases[p] = {"seconds": s, "tokens": tokens[p], "tokens_per_s": tps, "ran": p in active,
                     "tokens_per_s_per_device": tps / per_dev[p], "devices": per_dev[p],
                     "fraction_of_step": s / step_s if step_s else 0.0}
        if phase_flops[p]:
            tf = F.tflops_per_device(phase_flops[p], s, per_dev[p])
            phases[p].update(flops=phase_flops[p], tflops_per_device=tf, mfu=F.mfu(tf, peak))
    sync_bytes = mean([r["metrics"].get("sync_bytes", 0.0) for r in timed])
    sync_xfer = mean([r["metrics"].get("sync_seconds", 0.0) for r in timed])
    phases["sync"].update(bytes=sync_bytes, bytes_per_s=sync_bytes / secs["sync"] if secs["sync"] else 0.0,
                          transfer_seconds=sync_xfer)
    overhead = step_s - sum(secs.values())
    # the step time measured around the phases that ran (train-only: includes making the synthetic rollout)
    forced = all(len(r) == cfg.bench.response_len for ro in rollouts for r in ro.response_ids)
    mem = raw["memory"]
    return {
        "schema": 1,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": os.uname().nodename,
        "model": {"name": cfg.bench.model or ("init_from" if cfg.model.init_from else "arch"),
                  "params": model_cfg.num_parameters(), "flops_per_token_fwd": F.flops_per_token_fwd(model_cfg),
                  "attention_flops_fwd_at_seq": {"seq_len": cfg.bench.prompt_len + cfg.bench.response_len,
                                                 "flops": F.attention_flops_fwd(
                                                     model_cfg, cfg.bench.prompt_len + cfg.bench.response_len)},
                  "arch": model_cfg.to_dict(), "random_init": cfg.bench.random_init or bool(cfg.bench.model)},
        "layout": lay,
        "workload": {"prompts_per_step": cfg.rollout.prompts_per_step,
                     "samples_per_prompt": cfg.rollout.samples_per_prompt, "prompt_len": cfg.bench.prompt_len,
                     "response_len": cfg.bench.response_len, "forced_lengths_held": forced,
                     "updates_per_step": cfg.algo.updates_per_step, "logprob_passes": logprob_passes,
                     "micro_batch_tokens": cfg.train.parallel.micro_batch_tokens,
                     "steps": steps, "warmup": warmup, "only": only},
        "device": dev,
        "phases": phases,
        "step_seconds": step_s,
        "overhead_seconds": overhead,
        "step": {"tokens": all_tokens, "tokens_per_s": all_tokens / step_s if step_s else 0.0,
                 "tokens_per_s_per_device": all_tokens / step_s / lay["devices"] if step_s else 0.0,
                 "trainer_idle_fraction": secs["rollout"] / step_s if step_s else 0.0,
                 "rollout_idle_fraction": max(0.0, step_s - secs["rollout"] - secs["sync"]) / step_s
                 if step_s else 0.0},
        "steps": [{"step": r["step"], "warmup": r["warmup"], "step_seconds": r["step_seconds"],
                   **{f"{p}_seconds": r["metrics"].get(f"time/{p}", 0.0) for p in PHASES},
                   "sync_bytes": r["metrics"].get("sync_bytes", 0.0)} for r in raw["records"]],
        "setup_seconds": raw["setup_seconds"],
        "memory": {"per_rank": mem, "engines": raw["engine_memory"],
                   "max_rss_bytes": max(m["rss_peak_bytes"] for m in mem),
                   "max_rss_above_baseline_bytes": max(m["rss_peak_bytes"] - (m["rss_baseline_bytes"] or 0)
                                                       for m in mem),
                   "max_cuda_allocated_bytes": max((m["cuda_max_allocated_bytes"] or 0) for m in mem) or None},
        "nvml": raw["nvml"],
        "timed_steps": n,
    }
