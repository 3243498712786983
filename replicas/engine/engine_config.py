"""Engine settings and the KV layout they imply for a given model.

The KV budget is in bytes (what an operator knows); block counts per pool follow from the model's
bytes per block in each pool: GA layers in one pool, SWA layers plus the MTP blocks in the other.
MTP drafting lags by up to `num_mtp_drafts` slots, so SWA blocks are kept that much longer; each
draft needs an MTP block of its own, which a checkpoint saved without MTP tensors does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mimo.config import LayerType, MiMoConfig
from mimo.sizes import kv_bytes_per_token
from replicas.engine.kv_layout import KVLayout, plan_layout
from replicas.engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class EngineConfig:
    # the served defaults: `cluster.spec.EngineSpec` takes its defaults from these
    block_size: int = 16
    kv_cache_bytes: int = 256 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_prefill_chunk: int = 512
    # prompt tokens of one request (and of the step) in a step with no decode; 0: off (SchedulerConfig)
    long_prefill_chunk: int = 0
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_mtp_drafts: int = 0  # 0 = no speculative decoding; up to the checkpoint's MTP blocks
    # Draft only in steps where at most this many sequences sample (None: in every step). Verifying
    # k drafts feeds k + 1 rows per sequence, so once the step is compute-bound drafting costs more
    # than it saves: on this 2-core CPU with the tiny model's distilled MTP blocks, 3 drafts gained
    # 1.67x at 1 sequence, 1.46/1.54/1.26/1.21/1.05x at 2/3/4/6/8 and lost at 32 (0.86x).
    max_draft_batch: int | None = None
    enable_prefix_cache: bool = True
    # A request not yet scheduled this long after it reached the API (`GenerateRequest.arrival_s`)
    # ends with a retriable error (the API's 503 + Retry-After). Prefill does not count: a request
    # is safe once started. None here, so an offline batch (`Engine.generate`) runs every request;
    # the served default is `cluster.spec.EngineSpec.max_queue_wait_s`.
    max_queue_wait_s: float | None = None
    kv_dtype_bytes: int = 4  # the runner keeps K/V in the model's dtype (fp32 here)

    def validate(self, model: MiMoConfig, checkpoint: str | Path | None = None) -> None:
        """Raises ValueError naming the setting at fault; `checkpoint` (the model's directory) goes
        into the message when the model lacks the MTP blocks that drafting needs."""
        if self.num_mtp_drafts < 0:
            raise ValueError(f"engine.num_mtp_drafts must be >= 0, got {self.num_mtp_drafts}")
        shortfall = mtp_shortfall(self.num_mtp_drafts, model, checkpoint)
        if shortfall is not None:
            raise ValueError(f"engine.num_mtp_drafts={self.num_mtp_drafts} but {shortfall}")
        if self.long_prefill_chunk < 0:
            raise ValueError(f"long_prefill_chunk must be >= 0, got {self.long_prefill_chunk}")
        if self.max_queue_wait_s is not None and self.max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0 or None, got {self.max_queue_wait_s}")
        if self.max_draft_batch is not None and self.max_draft_batch < 1:
            raise ValueError(f"max_draft_batch must be >= 1 or None, got {self.max_draft_batch}")


def mtp_shortfall(num_mtp_drafts: int, model: MiMoConfig, checkpoint: str | Path | None) -> str | None:
    """Why `num_mtp_drafts` drafts per step cannot run on `model` (one MTP block per draft), or None."""
    if num_mtp_drafts <= model.num_mtp_layers:
        return None
    where = "the model" if checkpoint is None else f"checkpoint {checkpoint}"
    if model.num_mtp_layers == 0:
        return f"{where} has no MTP blocks, so MTP drafting is unavailable: set num_mtp_drafts to 0"
    return f"{where} has only {model.num_mtp_layers} MTP blocks"


def pool_bytes_per_token(model: MiMoConfig, config: EngineConfig) -> tuple[int, int]:
    """KV bytes one token takes in the GA pool (GA layers) and in the SWA pool (SWA layers plus the
    MTP blocks used for drafting, exactly what the runner allocates)."""
    num_full = sum(t is LayerType.FULL for t in model.layer_types)
    num_swa = len(model.layer_types) - num_full + config.num_mtp_drafts
    return (
        num_full * kv_bytes_per_token(model.full_attention, config.kv_dtype_bytes),
        num_swa * kv_bytes_per_token(model.sliding_attention, config.kv_dtype_bytes),
    )


def single_sequence_budget(model: MiMoConfig, config: EngineConfig, max_len: int) -> int:
    """KV bytes for one sequence of `max_len` tokens under `config` (what `mimo generate` needs)."""
    full, swa = pool_bytes_per_token(model, config)
    bs = config.block_size
    swa_tokens = model.sliding_window_size + 2 * config.num_mtp_drafts + max_step_tokens(config) + 3 * bs
    # the layout gives the SWA pool at most half the budget, and the GA pool must hold max_len
    return max(
        2 * swa * swa_tokens, swa * swa_tokens + full * (max_len + config.num_mtp_drafts + bs)
    ) + bs * (full + swa)


def max_step_tokens(config: EngineConfig) -> int:
    """Most tokens one step feeds (`SchedulerConfig.max_step_tokens`): what the SWA pool must cover."""
    return max(config.max_num_batched_tokens, config.long_prefill_chunk)


def context_limit(model: MiMoConfig, max_model_len: int | None) -> int:
    """The context a replica serves: the configured limit, never past the model's positions (the
    one place this clamp is written: the engine, the KV layout and the gateway all ask it)."""
    return min(max_model_len or model.max_position_embeddings, model.max_position_embeddings)


def build_layout(model: MiMoConfig, config: EngineConfig) -> KVLayout:
    config.validate(model)
    full, swa = pool_bytes_per_token(model, config)
    full_bytes, swa_bytes = full * config.block_size, swa * config.block_size
    max_model_len = context_limit(model, config.max_model_len)
    return plan_layout(
        budget_bytes=config.kv_cache_bytes,
        full_bytes_per_block=max(1, full_bytes),
        swa_bytes_per_block=max(1, swa_bytes),
        block_size=config.block_size,
        window=model.sliding_window_size + config.num_mtp_drafts,
        max_running=config.max_num_seqs,
        max_step_tokens=max_step_tokens(config),
        max_model_len=max_model_len,
        num_lookahead_tokens=config.num_mtp_drafts,
    )


def scheduler_config(model: MiMoConfig, config: EngineConfig) -> SchedulerConfig:
    """The scheduler settings `config` implies (what the engine runs; tests drive it without a model)."""
    return SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_prefill_chunk=config.max_prefill_chunk,
        block_size=config.block_size,
        max_model_len=context_limit(model, config.max_model_len),
        num_lookahead_tokens=config.num_mtp_drafts,
        long_prefill_chunk=config.long_prefill_chunk,
    )
