"""A 262,144-token request through the engine's scheduler and KV manager on the release's shape.

No weights and no model: the release's config.json sizes the pools exactly as a served replica
would (`build_layout`, the served block size and chunk), the scheduler steps its chunked prefill and
decodes, and a stand-in for the runner returns one token per sampling step. After every `schedule()`
the blocks held per pool must equal what the capacity plan (`mimo plan`'s `kv_bytes_held`) says
for that step, and the SWA pool must stay window-sized however long the sequence grows.
"""

from __future__ import annotations

import pytest

from cluster.cli.inspect_report import inspect_report
from cluster.cli.main import RELEASED_CONFIG
from cluster.cli.plan import model_numbers
from mimo.config import LayerType, MiMoConfig
from observability.capacity import kv_bytes_held
from replicas.engine.engine_config import EngineConfig, build_layout, pool_bytes_per_token, scheduler_config
from replicas.engine.kv_cache import KVCacheManager
from replicas.engine.kv_layout import swa_blocks_per_seq
from replicas.engine.requests import EngineRequest, SeqOutput, StepOutput, StepPlan
from replicas.engine.scheduler import Scheduler

CONTEXT = 262_144
NUM_OUTPUT = 4  # the prompt is CONTEXT - NUM_OUTPUT tokens; the last output fills max_model_len
NEXT_TOKEN = 7


def _sampling_output(plan: StepPlan) -> StepOutput:
    """The runner's part without a model: one token per sampling step, no drafts proposed."""
    return StepOutput([SeqOutput(s.request_id, [NEXT_TOKEN]) for s in plan.scheduled if s.is_last_chunk])


@pytest.mark.parametrize("num_mtp_drafts", [0, 3])
def test_262k_request_holds_the_plans_blocks_per_pool(num_mtp_drafts: int) -> None:
    """Catches the engine's KV accounting drifting from the capacity plan at the release's shape
    and context (an SWA block kept one step too long or freed too early, GA blocks over-allocated
    past the last position, MTP lookahead slots or the MTP window widening missed on either side),
    and SWA memory growing with the context instead of staying window-sized."""
    model = MiMoConfig.from_file(RELEASED_CONFIG)
    assert model.max_position_embeddings == CONTEXT and model.sliding_window_size == 128
    assert sum(t is LayerType.FULL for t in model.layer_types) == 9
    served = EngineConfig()  # the served block size, chunk and step budget (long chunk off)
    config = EngineConfig(
        kv_cache_bytes=16 * 2**30,  # bf16 KV of one 256K sequence is ~6 GiB GA + a window of SWA
        kv_dtype_bytes=2,
        num_mtp_drafts=num_mtp_drafts,
    )
    assert (config.block_size, config.max_prefill_chunk) == (served.block_size, served.max_prefill_chunk)
    layout = build_layout(model, config)
    kv = KVCacheManager(layout)
    scheduler = Scheduler(scheduler_config(model, config), kv)  # what Engine builds, minus the runner
    assert scheduler.config.max_model_len == CONTEXT
    # the plan prices a token the way the engine allocates it (MTP blocks in the SWA pool)
    numbers = model_numbers(model)
    one_token = kv_bytes_held(numbers, 0, 1, 2, 1, num_mtp_drafts)
    plan_full, plan_swa = one_token.full, one_token.swa
    assert (plan_full, plan_swa) == pool_bytes_per_token(model, config)
    full_per_block, swa_per_block = plan_full * layout.block_size, plan_swa * layout.block_size

    prompt = [10 + i % 1000 for i in range(CONTEXT - NUM_OUTPUT)]
    scheduler.add(EngineRequest("long", tuple(prompt), max_tokens=NUM_OUTPUT))
    swa_bound = swa_blocks_per_seq(
        layout.window, layout.block_size, scheduler.config.max_step_positions_per_seq
    )
    num_computed = num_steps = peak_full = peak_swa = 0
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        (seq,) = plan.scheduled
        assert seq.start_position == num_computed
        num_written = len(seq.token_ids) + seq.num_lookahead_slots
        want = kv_bytes_held(numbers, num_computed, num_written, 2, layout.block_size, num_mtp_drafts)
        usage = kv.usage()
        assert usage["full"].num_used * full_per_block == want.full, f"GA at step {num_steps}"
        assert usage["swa"].num_used * swa_per_block == want.swa, f"SWA at step {num_steps}"
        assert usage["swa"].num_used <= swa_bound, f"SWA past its bound at step {num_steps}"
        peak_full = max(peak_full, usage["full"].num_used)
        peak_swa = max(peak_swa, usage["swa"].num_used)
        if num_steps % 128 == 0:
            kv.check_invariants()
        scheduler.update(plan, _sampling_output(plan))
        num_computed += len(seq.token_ids)
        num_steps += 1

    num_prefill_steps = -(-(CONTEXT - NUM_OUTPUT) // config.max_prefill_chunk)
    assert num_steps == num_prefill_steps + NUM_OUTPUT - 1  # the last output is never fed
    assert num_computed == CONTEXT - 1
    # at its longest (the last decode) GA held every position plus the lookahead slots; with no
    # drafts that is `mimo inspect`'s GA share of a 262,144-token sequence, byte for byte
    report = inspect_report(model, CONTEXT)
    num_swa_layers = len(report["layers"][LayerType.SLIDING.value])
    swa_kept = (model.sliding_window_size + 1) * num_swa_layers
    inspect_full = (
        report["kv_bytes_hybrid"] - swa_kept * report["kv_bytes_per_token"][LayerType.SLIDING.value]
    )
    assert inspect_full == CONTEXT * plan_full
    assert peak_full == -(-(CONTEXT - 1 + num_mtp_drafts) // layout.block_size)
    if num_mtp_drafts == 0:
        assert peak_full * full_per_block == inspect_full
    # SWA peaked while a whole (block-aligned) chunk was written after a whole window, the same
    # 40 blocks (41 with MTP's wider window) at 1K as at 256K tokens
    chunk_blocks, window_blocks = (
        config.max_prefill_chunk // layout.block_size,
        -(-layout.window // layout.block_size),
    )
    assert peak_swa == chunk_blocks + window_blocks == 40 + (num_mtp_drafts > 0)
    assert kv.usage()["full"].num_used == 0 and kv.usage()["swa"].num_used == 0
    kv.check_invariants()
