"""Held-out evaluation through the same engines the rollouts use, reported as reasoning papers do.

`eval.sets` names several benchmarks (`aime24: {path, samples: 32, temperature: 1.0}` ...).
Each set's problems are sampled k times; the set reports avg@k, unbiased pass@k, response length
(mean, median), truncation rate and, on the same sampled responses, the policy's mean entropy and
CDP fraction (ERPO's critical-decision-pivot statistic), so a run can be put next to a paper's table.
With no sets configured the old single-split evaluation runs (one greedy sample per prompt of
`eval.split`, flat metric names), so existing configs and curves keep their meaning.

Generation happens on rank 0 only; the entropy pass is a forward of the training policy and
therefore collective: every training rank must call `score_entropy` with the same rollouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from erpo_mega.config import ConfigError
from erpo_mega.data.batcher import PromptBatch
from erpo_mega.data.datasets import DataConfig, load_prompts
from erpo_mega.data.prompts import encode_prompts
from erpo_mega.data.types import PromptItem
from erpo_mega.observe.eval_metrics import sampled_eval_metrics
from erpo_mega.orchestration.eval_config import EvalSetConfig, legacy_set_config
from erpo_mega.orchestration.rollout_step import Rollout, generate_rollout


@dataclass
class EvalSet:
    """A loaded set: its prompts encoded, ready for the engines."""

    name: str  # "" for the legacy single-split evaluation (flat metric names)
    cfg: EvalSetConfig
    items: list[PromptItem]
    input_ids: list[list[int]]
    label: str = ""  # how the table shows it

    def key(self, metric: str) -> str:
        return f"{self.name}/{metric}" if self.name else metric


def set_data_config(data: DataConfig, s: EvalSetConfig) -> DataConfig:
    """The run's data config (templates, chat, limits) pointed at a set's file."""
    source = "parquet" if s.path.endswith(".parquet") else "jsonl"
    return replace(data, source=source, path=s.path, style=s.style, prompt_field=None, answer_fields=None)


def load_eval_set(name: str, s: EvalSetConfig, data: DataConfig, tokenizer, task=None) -> EvalSet:
    """Read and encode one set; the built-in task when `path` is None (needs `task`)."""
    if s.path is None:
        if task is None:
            raise ConfigError(f"eval.sets.{name}.path" if name else "eval.split",
                              "is required unless data.source is builtin (the built-in task)")
        items = task.items(s.split, s.num_prompts or data.builtin_eval_size)
        dcfg = data
    else:
        dcfg = set_data_config(data, s)
        items = load_prompts(dcfg).items
        if s.num_prompts:
            items = items[: s.num_prompts]
    enc = encode_prompts(items, tokenizer, dcfg)
    label = name or s.split
    return EvalSet(name, s, enc.items, enc.input_ids, label=label)


def generate_set(client, es: EvalSet, tokenizer, reward_fn, *, run_seed: int, step: int,
                 default_max_new_tokens: int, concurrency: int = 8) -> Rollout:
    """k samples of every problem of one set (sample seeds salted with the set name)."""
    s = es.cfg
    batch = PromptBatch(items=list(es.items), indices=list(range(len(es.items))), group_size=s.samples,
                        step=step, epoch=0)
    return generate_rollout(client, batch, es.input_ids, tokenizer, reward_fn, run_seed=run_seed, step=step,
                            max_new_tokens=s.max_new_tokens or default_max_new_tokens,
                            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            salt=f"eval:{es.name}" if es.name else "eval", concurrency=concurrency)


def entropy_temperature(s: EvalSetConfig) -> float:
    """The distribution the entropy is measured on: the sampling one (greedy: the model's own, T=1)."""
    return s.temperature if s.temperature > 0 else 1.0


def score_entropy(worker, prompt_ids: list[list[int]], response_ids: list[list[int]], group_ids: list[int],
                  temperature: float, erpo_cfg) -> dict[str, float]:
    """Mean policy entropy and CDP statistics of sampled responses (collective over training ranks)."""
    import torch

    from erpo_mega.algo.advantages import cdp_statistics
    from erpo_mega.megatron.batching import PolicyBatch

    keep = [i for i, r in enumerate(response_ids) if r]  # an empty response has no token to score
    if len(keep) < _dp_size():  # every data-parallel rank needs a sample; a set this small is not scored
        return {"entropy_mean": float("nan"), "entropy_mean_cdp": float("nan"), "cdp_fraction": float("nan")}
    batch = PolicyBatch(prompt_ids=[prompt_ids[i] for i in keep], response_ids=[response_ids[i] for i in keep])
    _, entropy = worker.compute_logprobs(batch, temperature=temperature)
    stats = cdp_statistics(entropy, batch.response_mask(), torch.tensor([group_ids[i] for i in keep]), erpo_cfg)
    return {k: float(stats[k]) for k in ("entropy_mean", "entropy_mean_cdp", "cdp_fraction")}


def _dp_size() -> int:
    try:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    except Exception:  # no megatron process groups (unit use): one rank
        return 1


def set_metrics(es: EvalSet, ro: Rollout) -> dict[str, float]:
    """avg@k, pass@k, lengths, truncation and accuracy of one set's rollout (names prefixed by the set)."""
    k = es.cfg.samples
    p = len(es.items)
    rewards = np.asarray(ro.rewards, dtype=np.float64).reshape(p, k)
    lens = np.asarray([len(r) for r in ro.response_ids]).reshape(p, k)
    trunc = np.asarray(ro.truncated).reshape(p, k)
    m = sampled_eval_metrics(rewards >= 1.0, lens, trunc, ks=es.cfg.pass_k)
    m["accuracy"] = float((rewards >= 1.0).mean())
    m["reward_mean"] = float(rewards.mean())
    return {es.key(name): v for name, v in m.items()}


def evaluate(client, items, prompt_ids, tokenizer, reward_fn, *, run_seed: int, step: int, max_new_tokens: int,
             temperature: float = 0.0, concurrency: int = 8) -> dict[str, float]:
    """Accuracy (reward == 1), mean reward and response length on `items` (one sample each)."""
    es = EvalSet("", legacy_set_config("test", len(items), temperature, max_new_tokens), list(items),
                 list(prompt_ids))
    ro = generate_set(client, es, tokenizer, reward_fn, run_seed=run_seed, step=step,
                      default_max_new_tokens=max_new_tokens, concurrency=concurrency)
    return set_metrics(es, ro)


# ---------------------------------------------------------------------------------- the table ---
_COLUMNS = (("num_prompts", "problems", "{:.0f}"), ("samples", "k", "{:.0f}")), (
    ("response_len_mean", "len mean", "{:.1f}"), ("response_len_median", "len median", "{:.1f}"),
    ("truncated_fraction", "truncated", "{:.3f}"), ("entropy_mean", "entropy", "{:.3f}"),
    ("cdp_fraction", "CDP frac", "{:.3f}"))


def split_by_set(metrics: dict[str, float], default_label: str = "eval") -> dict[str, dict[str, float]]:
    """{set: {metric: value}} from flat metric names (`aime24/pass@8`; unprefixed: the legacy set)."""
    out: dict[str, dict[str, float]] = {}
    for key, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        name, _, metric = key.rpartition("/")
        if name == "time":
            continue
        out.setdefault(name or default_label, {})[metric] = float(v)
    return out


def _k_order(metric: str) -> tuple[int, int]:
    kind, _, k = metric.partition("@")
    return (0 if kind == "avg" else 1, int(k))


def eval_table(metrics: dict[str, float], title: str = "evaluation", default_label: str = "eval"):
    """A rich Table: one row per set; avg@k and every pass@k reported by any set as columns."""
    from rich.table import Table

    by_set = split_by_set(metrics, default_label)
    at_cols = sorted({m for row in by_set.values() for m in row if re.match(r"^(avg|pass)@\d+$", m)}, key=_k_order)
    table = Table(title=title)
    table.add_column("set")
    head, tail = _COLUMNS
    for _, label, _ in head:
        table.add_column(label, justify="right")
    for m in at_cols:
        table.add_column(m, justify="right")
    for _, label, _ in tail:
        table.add_column(label, justify="right")
    for name, row in by_set.items():
        cells = [name]
        for key, _, fmt in head:
            cells.append(fmt.format(row[key]) if key in row else "")
        cells += [f"{row[m]:.3f}" if m in row else "" for m in at_cols]
        for key, _, fmt in tail:
            cells.append(fmt.format(row[key]) if key in row else "")
        table.add_row(*cells)
    return table


def print_eval_table(metrics: dict[str, float], title: str = "evaluation", default_label: str = "eval") -> None:
    from rich.console import Console

    Console(width=200).print(eval_table(metrics, title, default_label))


def write_samples(path, eval_sets: list[EvalSet], rollouts: list[Rollout]) -> None:
    """Every sampled response, one JSON line each (set, problem, sample, reward, length, text), so a
    score can be re-derived or inspected later; written whole to a temp file, then renamed."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        for es, ro in zip(eval_sets, rollouts):
            k = es.cfg.samples
            for i, (item, text) in enumerate(zip(ro.items, ro.texts)):
                fh.write(json.dumps({
                    "set": es.label, "problem": i // k, "sample": i % k, "answer": item.answer,
                    "reward": ro.rewards[i], "response_len": len(ro.response_ids[i]),
                    "truncated": ro.truncated[i], "response": text, "response_ids": ro.response_ids[i]}) + "\n")
    tmp.replace(path)
