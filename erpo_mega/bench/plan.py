"""`erpo-mega bench plan`: predict step time and memory per device for a model size and node count.

From one measured bench.json (the *rates* run) it takes what the hardware achieved, and from
the FLOP and byte counts what the target asks for:

- train / logprob seconds = FLOPs of the target batch / (train devices x achieved FLOP/s per
  device), the achieved rate being the measured MFU x the target's peak when both peaks are
  known, else the measured TFLOP/s per device as is (same device class assumed);
- rollout seconds = response tokens / (engine devices x measured decode tokens/s per device x
  measured params / target params): decoding reads every weight once per step, so the rate
  per device falls with the bytes of weights it holds (bandwidth-bound assumption);
- sync seconds = target weight bytes / measured sync bytes per second;
- overhead = the measured overhead per sample x target samples.

Memory per training device (as erpo_mega/megatron/setup.py builds it: distributed optimizer,
fp32 grad buffer): weights + grads + optimizer state of the rank's shard, activations of one
micro-batch per layer on the rank (x in-flight micro-batches under PP) and the fp32 logits of
a micro-batch. Every term is printed with its inputs so a reader can redo the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from erpo_mega.bench import flops as F
from erpo_mega.bench.peaks import lookup_peak
from erpo_mega.models.config import ModelConfig

GIB = 2**30


class PlanError(ValueError):
    pass


@dataclass
class Target:
    model: ModelConfig
    name: str
    nodes: int
    devices_per_node: int
    tp: int
    pp: int
    placement: str  # colocated | disaggregated
    rollout_nodes: int
    prompts: int
    samples: int
    prompt_len: int
    response_len: int
    micro_batch_tokens: int
    bf16: bool
    peak_tflops: float | None
    engine_devices_override: int | None = None  # engines on fewer devices than the placement gives them

    @property
    def train_devices(self) -> int:
        n = self.nodes - self.rollout_nodes if self.placement == "disaggregated" else self.nodes
        return n * self.devices_per_node

    @property
    def engine_devices(self) -> int:
        if self.engine_devices_override:
            return self.engine_devices_override
        n = self.rollout_nodes if self.placement == "disaggregated" else self.nodes
        return n * self.devices_per_node

    @property
    def dp(self) -> int:
        return self.train_devices // (self.tp * self.pp)


def check(t: Target) -> None:
    if t.placement == "disaggregated" and not 0 < t.rollout_nodes < t.nodes:
        raise PlanError(f"--rollout-nodes must be between 1 and nodes-1 ({t.nodes - 1}) when disaggregated")
    if t.train_devices % (t.tp * t.pp):
        raise PlanError(f"train devices {t.train_devices} not divisible by tp*pp = {t.tp}*{t.pp}")
    if t.model.num_layers % t.pp:
        raise PlanError(f"num_layers {t.model.num_layers} not divisible by pp={t.pp}")


def memory_terms(t: Target) -> list[tuple[str, float, str]]:
    """(term, bytes, derivation) for the most loaded training rank."""
    m = t.model
    h, V, L = m.hidden_size, m.vocab_size, m.num_layers
    per_layer = m.num_parameters() - V * h * (1 if m.tie_word_embeddings else 2) - h
    per_layer //= L
    # the heaviest stage: L/pp layers plus the embedding (first stage) or head (last stage), or both at pp=1
    emb = V * h * ((1 if m.tie_word_embeddings else 2) if t.pp == 1 else 1)
    shard = (L // t.pp * per_layer + emb) / t.tp
    if t.bf16:
        w, g, o, note = 2, 4, 12, "bf16 weights 2 B + fp32 grad buffer 4 B + (fp32 main, Adam m, v) 12 B / dp"
    else:
        w, g, o, note = 4, 4, 8, "fp32 weights 4 B + fp32 grads 4 B + (Adam m, v) 8 B / dp"
    act_b = 2 if t.bf16 else 4
    tokens = t.micro_batch_tokens
    in_flight = t.pp  # 1F1B: the first stage holds up to pp micro-batches
    # Korthikanti et al. 2022, no sequence parallel, flash attention (no s^2 term), per token and layer:
    # (10 + 24/tp) * h bytes at 2-byte activations; scaled by the activation width here.
    act = (10 + 24 / t.tp) * h * act_b / 2 * tokens * (L // t.pp) * in_flight
    logits = 3 * tokens * V / t.tp * 4
    return [
        ("weights", shard * w, f"{shard:,.0f} params on the rank ((L/pp={L // t.pp}) x {per_layer:,} + "
                               f"embedding/head {emb:,}) / tp={t.tp} x {w} B"),
        ("grads", shard * g, f"{shard:,.0f} x {g} B"),
        ("optimizer", shard * o / t.dp, f"{shard:,.0f} x {o} B / dp={t.dp} ({note})"),
        ("activations", act, f"(10 + 24/tp) x h={h} x {act_b} B/2 per token-layer x {tokens} tokens x "
                             f"{L // t.pp} layers x {in_flight} in flight"),
        ("logits", logits, f"3 fp32 copies x {tokens} tokens x V/tp={V // t.tp}"),
    ]


def predict(rates: dict, t: Target) -> dict:
    """Predicted seconds per phase and memory per device, each with its derivation."""
    check(t)
    m_model = ModelConfig.from_dict(rates["model"]["arch"])
    m_params, params = m_model.num_parameters(), t.model.num_parameters()
    ph = rates["phases"]
    n = t.prompts * t.samples
    seq = [t.prompt_len + t.response_len] * n
    fwd = F.batch_flops_fwd(t.model, seq)
    m_peak = rates["device"].get("peak_tflops")
    terms: dict[str, tuple[float, str]] = {}

    for phase, mult in (("train", 3), ("logprob", rates["workload"].get("logprob_passes", 1))):
        flops = mult * fwd
        mfu = ph[phase].get("mfu")
        if mfu and t.peak_tflops and m_peak:
            rate = mfu * t.peak_tflops
            how = f"measured MFU {mfu:.3f} x target peak {t.peak_tflops} TFLOP/s"
        else:
            rate = ph[phase]["tflops_per_device"]
            how = "measured TFLOP/s per device (same device class)"
        s = flops / (t.train_devices * rate * 1e12)
        terms[phase] = (s, f"{flops:.4g} FLOPs ({mult} x fwd of {n} x {seq[0]} tokens) / ({t.train_devices} "
                           f"devices x {rate:.4g} TFLOP/s: {how})")
    r_dev = ph["rollout"]["tokens_per_s_per_device"] * m_params / params
    resp = n * t.response_len
    terms["rollout"] = (resp / (t.engine_devices * r_dev),
                        f"{resp} response tokens / ({t.engine_devices} engine devices x {r_dev:.4g} tok/s; "
                        f"measured {ph['rollout']['tokens_per_s_per_device']:.4g} x params {m_params:,} / {params:,})")
    m_bytes_per_param = ph["sync"]["bytes"] / m_params if m_params else 2
    bpp = 2 if t.bf16 else 4
    sync_rate = ph["sync"]["bytes_per_s"]
    terms["sync"] = (params * bpp / sync_rate if sync_rate else 0.0,
                     f"{params:,} params x {bpp} B / measured {sync_rate / 2**20:.4g} MiB/s "
                     f"(measured run moved {m_bytes_per_param:.3g} B/param)")
    m_n = rates["workload"]["prompts_per_step"] * rates["workload"]["samples_per_prompt"]
    over = max(0.0, rates["overhead_seconds"]) / m_n * n
    terms["overhead"] = (over, f"measured {rates['overhead_seconds']:.4g} s / {m_n} samples x {n}")
    step = sum(v for v, _ in terms.values())
    mem = memory_terms(t)
    return {"target": {"model": t.name, "params": params, "nodes": t.nodes, "devices_per_node": t.devices_per_node,
                       "train_devices": t.train_devices, "engine_devices": t.engine_devices, "tp": t.tp, "pp": t.pp,
                       "dp": t.dp, "placement": t.placement, "samples": n, "prompt_len": t.prompt_len,
                       "response_len": t.response_len},
            "phases": {k: {"seconds": v, "derivation": d} for k, (v, d) in terms.items()},
            "step_seconds": step,
            "tokens_per_s_per_device": n * seq[0] / step / (t.train_devices + (t.engine_devices if
                                                                             t.placement == "disaggregated" else 0)),
            "memory": {"terms": [{"term": a, "bytes": b, "derivation": c} for a, b, c in mem],
                       "total_bytes": sum(b for _, b, _ in mem)},
            "rates_from": rates.get("_path")}


def compare(pred: dict, measured: dict) -> list[tuple[str, float, float]]:
    rows = [(p, pred["phases"][p]["seconds"], measured["phases"][p]["seconds"])
            for p in ("rollout", "logprob", "train", "sync")]
    rows.append(("step", pred["step_seconds"], measured["step_seconds"]))
    mm = measured["memory"]
    got = mm.get("max_cuda_allocated_bytes") or mm.get("max_rss_above_baseline_bytes") or mm.get("max_rss_bytes")
    rows.append(("memory GiB", pred["memory"]["total_bytes"] / GIB, got / GIB if got else float("nan")))
    return rows


def render(pred: dict, cmp_rows: list | None = None) -> str:
    t = pred["target"]
    out = [f"plan: {t['model']} ({t['params']:,} params) on {t['nodes']} node(s) x {t['devices_per_node']} devices, "
           f"{t['placement']}, train {t['train_devices']} (tp{t['tp']} pp{t['pp']} dp{t['dp']}), engines "
           f"{t['engine_devices']}; {t['samples']} samples of {t['prompt_len']} + {t['response_len']} tokens",
           f"rates from {pred['rates_from']}", ""]
    for k, v in pred["phases"].items():
        out.append(f"  {k:<9} {v['seconds']:10.3f} s   = {v['derivation']}")
    out.append(f"  {'step':<9} {pred['step_seconds']:10.3f} s   ({pred['tokens_per_s_per_device']:.1f} tokens/s/device)")
    out.append("")
    out.append(f"memory per training device: {pred['memory']['total_bytes'] / GIB:.2f} GiB")
    for term in pred["memory"]["terms"]:
        out.append(f"  {term['term']:<12} {term['bytes'] / GIB:9.3f} GiB = {term['derivation']}")
    if cmp_rows:
        out += ["", "| quantity | predicted | measured | predicted/measured |", "|---|---|---|---|"]
        for name, p, m in cmp_rows:
            ratio = p / m if m else float("nan")
            out.append(f"| {name} | {p:.3f} | {m:.3f} | {ratio:.2f} |")
    return "\n".join(out) + "\n"


def _load(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "bench.json"
    try:
        b = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{p}: not a readable bench.json ({e})") from None
    for key in ("model", "phases", "workload", "device", "layout"):
        if key not in b:
            raise PlanError(f"{p}: not a bench.json (missing '{key}')")
    b["_path"] = str(p)
    return b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="erpo-mega bench plan", description=__doc__.splitlines()[0])
    p.add_argument("--rates", required=True, help="a measured bench.json (or its dir) to take rates from")
    p.add_argument("--model", default="same", help="named shape (erpo_mega.bench.shapes) or 'same' (the rates run's)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--devices-per-node", type=int, default=8, help="GPUs (or CPU ranks) per node")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--placement", choices=("colocated", "disaggregated"), default="colocated")
    p.add_argument("--rollout-nodes", type=int, default=0, help="disaggregated: nodes serving rollouts")
    p.add_argument("--engine-devices", type=int, default=None,
                   help="devices generating (default: every device colocated, rollout nodes x devices disaggregated)")
    p.add_argument("--prompts", type=int, help="prompts per step (default: the rates run's)")
    p.add_argument("--samples", type=int, help="samples per prompt (default: the rates run's)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-len", type=int)
    p.add_argument("--micro-batch-tokens", type=int)
    p.add_argument("--device", help="target device name for the peak table (default: the rates run's)")
    p.add_argument("--peak-tflops", type=float, help="target peak TFLOP/s (overrides --device)")
    p.add_argument("--compare", help="a measured bench.json of the same shape: print predicted vs measured")
    p.add_argument("--json", help="also write the prediction here")
    args = p.parse_args(argv)
    try:
        rates = _load(args.rates)
        w = rates["workload"]
        if args.model == "same":
            model, name = ModelConfig.from_dict(rates["model"]["arch"]), rates["model"]["name"]
        else:
            from erpo_mega.bench.shapes import model_config

            try:
                model, name = model_config(args.model), args.model
            except KeyError as e:
                raise PlanError(str(e.args[0])) from None
        dev = args.device or rates["device"]["name"]
        bf16 = rates["device"]["bf16"] or lookup_peak(dev) is not None  # a GPU target trains in bf16
        peak = args.peak_tflops or lookup_peak(dev, bf16) or rates["device"].get("peak_tflops")
        for flag in ("nodes", "devices_per_node", "tp", "pp", "engine_devices", "prompts", "samples", "prompt_len", "response_len",
                     "micro_batch_tokens"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise PlanError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
        t = Target(model=model, name=name, nodes=args.nodes, devices_per_node=args.devices_per_node, tp=args.tp,
                   pp=args.pp, placement=args.placement, rollout_nodes=args.rollout_nodes,
                   prompts=args.prompts or w["prompts_per_step"], samples=args.samples or w["samples_per_prompt"],
                   prompt_len=args.prompt_len or w["prompt_len"], response_len=args.response_len or w["response_len"],
                   micro_batch_tokens=args.micro_batch_tokens or w["micro_batch_tokens"], bf16=bf16, peak_tflops=peak,
                   engine_devices_override=args.engine_devices)
        pred = predict(rates, t)
        cmp_rows = compare(pred, _load(args.compare)) if args.compare else None
    except PlanError as e:
        print(f"erpo-mega bench plan: error: {e}", file=sys.stderr)
        return 2
    print(render(pred, cmp_rows), end="")
    if args.json:
        Path(args.json).write_text(json.dumps({**pred, "compare": cmp_rows}, indent=1))
    return 0
