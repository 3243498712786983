"""Capacity model behind `mimo plan`: traffic + hardware + model numbers -> attention replicas,
expert shards, redundant experts and GPUs, with the reasoning behind each number.

Pure arithmetic on plain dataclasses (the caller builds `ModelNumbers` from `mimo.sizes`). KV per
sequence follows the engine's block rule exactly (GA keeps every block, SWA and MTP layers the
blocks a future window can see), so it can be checked against the running engine. Time is a
roofline per decode step in lockstep: attention (dense weights + KV reads vs FLOPs), the expert
pool on the union batch of all replicas, and the dispatch traffic, not overlapped (conservative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

GB = 10**9
GIB = 2**30


@dataclass(frozen=True)
class ModelNumbers:
    name: str
    hidden_size: int
    num_full_layers: int
    num_swa_layers: int
    num_mtp_layers: int
    kv_values_full: int  # K+V values one token stores in one GA layer: kv_heads x (qk_dim + v_dim)
    kv_values_swa: int
    window: int  # SWA keys besides the query: a query at p sees [p - window, p]
    num_q_heads: int
    qk_head_dim: int
    v_head_dim: int
    num_moe_layers: int
    num_experts: int
    experts_per_token: int
    params_per_expert: int
    dense_params: int  # everything but the routed experts (MTP blocks included)
    active_dense_params: int  # dense params one token goes through (main model)
    dense_weight_bytes: int  # at the deployed weight format
    expert_weight_bytes: int  # one expert, deployed format
    max_context: int


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: int
    bandwidth_bytes_s: float  # HBM
    flops: float  # dense bf16 FLOP/s
    interconnect_bytes_s: float  # per GPU, one direction
    memory_utilization: float = 0.9  # share of memory the server may take
    reserve_bytes: int = 4 * GB  # activations, workspaces, CUDA graphs
    compute_efficiency: float = 0.5  # achieved / peak FLOP/s
    bandwidth_efficiency: float = 0.7  # achieved / peak bytes/s
    kv_dtype_bytes: int = 2
    gpus_per_attention_replica: int = 1
    cost_per_gpu_hour: float = 1.0

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.memory_utilization) - self.reserve_bytes


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: (tokens, weight) points."""

    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if not self.points or any(n < 1 or w <= 0 for n, w in self.points):
            raise ValueError(f"lengths need (tokens >= 1, weight > 0) points, got {self.points}")

    @cached_property
    def mean(self) -> float:
        total = sum(w for _, w in self.points)
        return sum(n * w for n, w in self.points) / total

    @property
    def max(self) -> int:
        return max(n for n, _ in self.points)

    def quantile(self, q: float) -> int:
        total, acc = sum(w for _, w in self.points), 0.0
        for n, w in sorted(self.points):
            acc += w
            if acc >= q * total - 1e-12:
                return n
        return self.max


@dataclass(frozen=True)
class Traffic:
    qps: float
    input_tokens: Lengths
    output_tokens: Lengths
    ttft_slo_s: float  # p90
    itl_slo_s: float  # mean time per output token
    num_mtp_drafts: int = 0
    mtp_tokens_per_step: float = 1.0  # tokens a verify step emits on average (acceptance length)
    prefix_hit_rate: float = 0.0  # share of prompt tokens served from the prefix cache
    redundant_expert_fraction: float = 0.125  # extra copies per layer, of num_experts (DeepSeek: 32/256)


@dataclass(frozen=True)
class KVBytes:
    full: int
    swa: int

    @property
    def total(self) -> int:
        return self.full + self.swa


def kv_bytes_per_token(m: ModelNumbers, dtype_bytes: int) -> tuple[int, int]:
    """Bytes one token stores in ONE GA layer and in ONE SWA layer."""
    return m.kv_values_full * dtype_bytes, m.kv_values_swa * dtype_bytes


def kv_bytes_held(
    m: ModelNumbers,
    num_computed: int,
    num_new: int,
    dtype_bytes: int,
    block_size: int = 1,
    num_mtp_drafts: int = 0,
) -> KVBytes:
    """KV one sequence holds while a step writes `num_new` tokens after `num_computed` (the engine's
    allocation rule): GA every block up to the last position; SWA (plus one SWA-shaped layer per
    MTP draft) the blocks from the first one the window of position `num_computed` can see."""
    needed = -(-(num_computed + num_new) // block_size)
    first_live = max(0, num_computed - (m.window + num_mtp_drafts)) // block_size
    full, swa = kv_bytes_per_token(m, dtype_bytes)
    return KVBytes(
        needed * block_size * full * m.num_full_layers,
        (needed - first_live) * block_size * swa * (m.num_swa_layers + num_mtp_drafts),
    )


def kv_bytes_for_length(
    m: ModelNumbers, num_tokens: int, dtype_bytes: int, num_mtp_drafts: int = 0
) -> KVBytes:
    """KV of a sequence of `num_tokens` tokens decoding its next one (token-granular pages)."""
    return kv_bytes_held(m, num_tokens - 1, 1, dtype_bytes, 1, num_mtp_drafts)


@dataclass(frozen=True)
class StepTimes:
    attention_s: float
    experts_s: float
    dispatch_s: float

    @property
    def total_s(self) -> float:
        return self.attention_s + self.experts_s + self.dispatch_s


@dataclass(frozen=True)
class Plan:
    attention_replicas: int
    expert_shards: int
    redundant_experts_per_layer: int
    gpus: int
    cost_per_hour: float
    batch_per_replica: int
    concurrency: float
    attention_gpu_weight_bytes: int
    attention_gpu_kv_budget_bytes: int
    kv_bytes_per_sequence: int  # at mean input + output length
    max_sequences_by_kv: int
    experts_per_shard: int
    expert_gpu_weight_bytes: int
    step: StepTimes
    itl_s: float
    ttft_p90_s: float
    prefill_utilization: float
    expert_utilization: float
    reasoning: tuple[str, ...] = field(default=())


class PlanError(ValueError):
    """No deployment meets the profile; the message says which constraint fails first."""


def _touched_fraction(m: ModelNumbers, num_rows: float) -> float:
    """Expected share of a layer's experts hit by `num_rows` tokens routed top-k uniformly."""
    return 1.0 - (1.0 - m.experts_per_token / m.num_experts) ** num_rows


def _prefill_s(m: ModelNumbers, hw: Hardware, num_tokens: float) -> float:
    """Compute-bound prefill of one prompt: 2 FLOPs per active param per token (dense + top-k
    experts) plus causal attention over GA layers (quadratic) and SWA layers (window)."""
    active = m.active_dense_params + m.num_moe_layers * m.experts_per_token * m.params_per_expert
    per_key = 2 * m.num_q_heads * (m.qk_head_dim + m.v_head_dim)
    attention = per_key * (
        m.num_full_layers * num_tokens * num_tokens / 2 + m.num_swa_layers * num_tokens * (m.window + 1)
    )
    return (2 * active * num_tokens + attention) / (hw.flops * hw.compute_efficiency)


def decode_step(
    m: ModelNumbers, hw: Hardware, t: Traffic, batch: int, replicas: int, shards: int
) -> StepTimes:
    """One lockstep decode step of `replicas` replicas with `batch` sequences each."""
    v = 1 + t.num_mtp_drafts  # tokens per sequence through the model per step
    ctx = t.input_tokens.mean + t.output_tokens.mean / 2  # time-average context while decoding
    kv_read = batch * kv_bytes_for_length(m, max(1, round(ctx)), hw.kv_dtype_bytes, t.num_mtp_drafts).total
    bw = hw.bandwidth_bytes_s * hw.bandwidth_efficiency
    fl = hw.flops * hw.compute_efficiency
    per_key = 2 * m.num_q_heads * (m.qk_head_dim + m.v_head_dim)
    attn_flops = (
        batch
        * v
        * (
            2 * m.active_dense_params
            + per_key * (m.num_full_layers * ctx + m.num_swa_layers * (m.window + 1))
        )
    )
    attention = max((m.dense_weight_bytes + kv_read) / bw, attn_flops / fl) / hw.gpus_per_attention_replica
    rows = replicas * batch * v * m.experts_per_token  # (token, expert) rows per MoE layer, all replicas
    weights = (
        m.num_moe_layers * m.num_experts * _touched_fraction(m, replicas * batch * v) * m.expert_weight_bytes
    )
    experts = max(weights / shards / bw, 2 * m.params_per_expert * rows * m.num_moe_layers / shards / fl)
    # each replica sends its rows (bf16 hidden) to the shards and gets them back, every MoE layer
    dispatch = (
        2
        * batch
        * v
        * m.experts_per_token
        * m.num_moe_layers
        * m.hidden_size
        * 2
        / (hw.interconnect_bytes_s * hw.bandwidth_efficiency)
    )
    return StepTimes(attention, experts, dispatch)


def redundant_per_layer(m: ModelNumbers, shards: int, fraction: float) -> int:
    """At least `fraction` x experts extra copies, rounded up so every shard holds as many slots."""
    r = math.ceil(fraction * m.num_experts - 1e-9)
    r = -(-(m.num_experts + r) // shards) * shards - m.num_experts
    return min(r, m.num_experts * (shards - 1))


def _check(m: ModelNumbers, hw: Hardware, t: Traffic, replicas: int, shards: int) -> tuple[Plan | None, str]:
    """The plan for this (replicas, shards), or None and the constraint that fails."""
    budget = hw.usable_bytes * hw.gpus_per_attention_replica - m.dense_weight_bytes
    seq_len = round(t.input_tokens.mean + t.output_tokens.mean)
    kv_seq = kv_bytes_for_length(m, seq_len, hw.kv_dtype_bytes, t.num_mtp_drafts).total
    max_seqs = budget // kv_seq
    prompt = t.input_tokens.mean * (1 - t.prefix_hit_rate)
    prefill_util = t.qps / replicas * _prefill_s(m, hw, prompt)
    if prefill_util >= 0.9:
        return None, f"prefill keeps each replica {prefill_util:.0%} busy (>= 90%)"
    concurrency = t.qps * (t.ttft_slo_s + t.output_tokens.mean * t.itl_slo_s)  # Little, at the SLOs
    batch = max(1, math.ceil(concurrency / replicas))
    if batch > max_seqs:
        return None, f"{batch} sequences per replica need more KV than the {max_seqs} that fit"
    step = decode_step(m, hw, t, batch, replicas, shards)
    itl = step.total_s / (t.mtp_tokens_per_step * (1 - prefill_util))
    if itl > t.itl_slo_s:
        return None, f"ITL {itl * 1e3:.1f} ms > SLO {t.itl_slo_s * 1e3:.1f} ms at batch {batch}"
    ttft = (
        _prefill_s(m, hw, t.input_tokens.quantile(0.9) * (1 - t.prefix_hit_rate)) / (1 - prefill_util)
        + step.total_s
    )
    if ttft > t.ttft_slo_s:
        return None, f"TTFT p90 {ttft:.2f} s > SLO {t.ttft_slo_s:.2f} s"
    fl = hw.flops * hw.compute_efficiency
    expert_prefill = (
        t.qps * prompt * m.experts_per_token * m.num_moe_layers * 2 * m.params_per_expert / (shards * fl)
    )
    expert_util = step.experts_s / step.total_s + expert_prefill
    if expert_util > 0.9:
        return None, f"expert shards {expert_util:.0%} busy (> 90%)"  # more replicas only add to it
    redundant = redundant_per_layer(m, shards, t.redundant_expert_fraction)
    slots = (m.num_experts + redundant) // shards * m.num_moe_layers
    gpus = replicas * hw.gpus_per_attention_replica + shards
    plan = Plan(
        attention_replicas=replicas, expert_shards=shards, redundant_experts_per_layer=redundant, gpus=gpus,
        cost_per_hour=gpus * hw.cost_per_gpu_hour, batch_per_replica=batch, concurrency=concurrency,
        attention_gpu_weight_bytes=m.dense_weight_bytes, attention_gpu_kv_budget_bytes=budget,
        kv_bytes_per_sequence=kv_seq, max_sequences_by_kv=max_seqs, experts_per_shard=slots,
        expert_gpu_weight_bytes=slots * m.expert_weight_bytes, step=step, itl_s=itl, ttft_p90_s=ttft,
        prefill_utilization=prefill_util, expert_utilization=expert_util,
    )  # fmt: skip
    return plan, ""


def min_expert_shards(m: ModelNumbers, hw: Hardware, fraction: float) -> int:
    """Fewest shards whose memory holds every expert plus the redundant copies."""
    shards = 1
    while True:
        slots = (m.num_experts + redundant_per_layer(m, shards, fraction)) // shards * m.num_moe_layers
        if slots * m.expert_weight_bytes <= hw.usable_bytes:
            return shards
        shards += 1
        if shards > m.num_experts:
            raise PlanError(f"one expert layer slice does not fit in {hw.usable_bytes / GB:.1f} GB")


def plan(m: ModelNumbers, hw: Hardware, t: Traffic, max_gpus: int = 4096) -> Plan:
    """The cheapest (fewest GPUs) deployment meeting the traffic's SLOs, with its reasoning."""
    if m.dense_weight_bytes >= hw.usable_bytes * hw.gpus_per_attention_replica:
        raise PlanError(
            f"dense weights {m.dense_weight_bytes / GB:.1f} GB exceed one replica's {hw.usable_bytes / GB:.1f} GB"
        )
    longest = kv_bytes_for_length(
        m, t.input_tokens.max + t.output_tokens.max, hw.kv_dtype_bytes, t.num_mtp_drafts
    ).total
    if longest > hw.usable_bytes * hw.gpus_per_attention_replica - m.dense_weight_bytes:
        raise PlanError(f"the longest sequence needs {longest / GB:.1f} GB of KV, more than one replica has")
    s_min = min_expert_shards(m, hw, t.redundant_expert_fraction)
    # lower bound on replicas: prefill below 90% busy and the in-flight sequences' KV
    concurrency = t.qps * (t.ttft_slo_s + t.output_tokens.mean * t.itl_slo_s)
    kv_seq = kv_bytes_for_length(
        m, round(t.input_tokens.mean + t.output_tokens.mean), hw.kv_dtype_bytes, t.num_mtp_drafts
    ).total
    max_seqs = max(1, (hw.usable_bytes * hw.gpus_per_attention_replica - m.dense_weight_bytes) // kv_seq)
    prefill_s = _prefill_s(m, hw, t.input_tokens.mean * (1 - t.prefix_hit_rate))
    r_min = max(1, math.ceil(concurrency / max_seqs), math.floor(t.qps * prefill_s / 0.9))
    best: Plan | None = None
    why = ""
    for shards in range(s_min, min(m.num_experts, s_min + 64) + 1):
        if best is not None and r_min * hw.gpus_per_attention_replica + shards >= best.gpus:
            break
        for replicas in range(r_min, max_gpus + 1):
            if replicas * hw.gpus_per_attention_replica + shards > (best.gpus if best else max_gpus):
                break
            p, why = _check(m, hw, t, replicas, shards)
            if p is not None:
                if best is None or p.gpus < best.gpus:
                    best = p
                break
            if why.startswith("expert shards"):
                break
    if best is None:
        raise PlanError(f"no deployment within {max_gpus} GPUs meets the profile; last failure: {why}")
    return _with_reasoning(best, m, hw, t, s_min)


def _with_reasoning(p: Plan, m: ModelNumbers, hw: Hardware, t: Traffic, s_min: int) -> Plan:
    full, swa = kv_bytes_per_token(m, hw.kv_dtype_bytes)
    seq = round(t.input_tokens.mean + t.output_tokens.mean)
    kv = kv_bytes_for_length(m, seq, hw.kv_dtype_bytes, t.num_mtp_drafts)
    lines = (
        f"KV per token: GA {full:,} B/layer x {m.num_full_layers} layers; SWA {swa:,} B/layer x "
        f"{m.num_swa_layers} layers (+{t.num_mtp_drafts} MTP) but only the last {m.window + 1 + t.num_mtp_drafts} tokens",
        f"KV per sequence of {seq:,} tokens (mean in + out): GA {kv.full / GB:.3f} GB + SWA {kv.swa / GB:.4f} GB "
        f"= {kv.total / GB:.3f} GB",
        f"attention GPU: {hw.usable_bytes / GB:.1f} GB usable ({hw.memory_utilization:.0%} of {hw.memory_bytes / GB:.0f} GB "
        f"- {hw.reserve_bytes / GB:.0f} GB reserve) - {p.attention_gpu_weight_bytes / GB:.2f} GB dense weights "
        f"= {p.attention_gpu_kv_budget_bytes / GB:.1f} GB KV -> {p.max_sequences_by_kv} sequences",
        f"experts: {m.num_moe_layers} layers x ({m.num_experts} + {p.redundant_experts_per_layer} redundant) = "
        f"{p.experts_per_shard} per shard x {m.expert_weight_bytes / 1e6:.1f} MB = {p.expert_gpu_weight_bytes / GB:.1f} GB "
        f"per expert GPU (memory alone needs {s_min} shards)",
        f"load: {t.qps:g} req/s x ({t.ttft_slo_s:g} s + {t.output_tokens.mean:.0f} tokens x {t.itl_slo_s * 1e3:g} ms) "
        f"= {p.concurrency:.0f} sequences in flight -> {p.batch_per_replica} per replica",
        f"decode step at that batch: attention {p.step.attention_s * 1e3:.1f} ms + experts {p.step.experts_s * 1e3:.1f} ms "
        f"+ dispatch {p.step.dispatch_s * 1e3:.1f} ms; MTP {t.mtp_tokens_per_step:g} tokens/step, prefill takes "
        f"{p.prefill_utilization:.0%} -> ITL {p.itl_s * 1e3:.1f} ms (SLO {t.itl_slo_s * 1e3:g})",
        f"TTFT p90 {p.ttft_p90_s:.2f} s (SLO {t.ttft_slo_s:g}); expert shards {p.expert_utilization:.0%} busy",
        f"plan: {p.attention_replicas} attention replicas x {hw.gpus_per_attention_replica} GPU + {p.expert_shards} "
        f"expert shards = {p.gpus} GPUs ({p.cost_per_hour:g}/h)",
    )
    return Plan(**{**p.__dict__, "reasoning": lines})


def cost_curve(
    m: ModelNumbers, hw: Hardware, t: Traffic, qps_values: list[float]
) -> list[tuple[float, int | None]]:
    """(qps, GPUs of the plan or None when none fits) for each load: the cost-against-load chart."""
    out: list[tuple[float, int | None]] = []
    for q in qps_values:
        try:
            out.append((q, plan(m, hw, Traffic(**{**t.__dict__, "qps": q})).gpus))
        except PlanError:
            out.append((q, None))
    return out
