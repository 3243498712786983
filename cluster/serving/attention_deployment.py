"""The `Attention` Serve deployment: one data-parallel attention replica with its own engine and KV
cache, experts reached through the shared pool's shard actors (over the same-node channel or Ray
actor calls, `spec.experts.transport`). It streams chunks to the gateway,
publishes its prefix-cache report for the router, its load for the autoscaler, and its metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.serving.engine_clients import stream_request
from cluster.serving.metrics_ray import ray_metrics
from cluster.serving.request_metrics import RequestTimer, TTFTWindow, record_finished
from cluster.spec import ClusterSpec
from gateway.engine_client import EngineError
from protocol.messages import Chunk, GenerateRequest, Refusal
from protocol.report import ReplicaReport, routing_stats

if TYPE_CHECKING:
    from replicas.experts.placement_switch import PlacementUpdate, ReplicaSwitch
    from replicas.experts.timed_transport import TimedTransport

REPORT_PERIOD_S = 1.0
LAYER_TYPES = {"full": "full_attention", "swa": "sliding_attention"}


def engine_config(spec: ClusterSpec) -> Any:
    from replicas.engine.engine_config import EngineConfig

    e = spec.engine
    return EngineConfig(
        block_size=e.block_size,
        kv_cache_bytes=e.kv_cache_mib * 2**20,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        max_prefill_chunk=e.max_prefill_chunk,
        long_prefill_chunk=e.long_prefill_chunk,
        max_model_len=e.max_model_len,
        num_mtp_drafts=e.num_mtp_drafts,
        max_draft_batch=e.max_draft_batch,
        enable_prefix_cache=e.enable_prefix_cache,
        max_queue_wait_s=e.max_queue_wait_s,
        kv_dtype_bytes=4 if spec.model.dtype == "float32" else 2,
    )


class AttentionDeployment:
    async def __init__(self, spec: ClusterSpec, pool: DeploymentHandle | None) -> None:  # type: ignore[misc]
        import torch

        from mimo.device import device_for_gpus
        from mimo.tokenizer import Tokenizer
        from mimo.weights import load_model
        from replicas.engine.async_engine import AsyncEngine
        from replicas.engine.engine import Engine
        from replicas.experts.dispatch import ExpertDispatcher
        from replicas.experts.placement_switch import ReplicaSwitch
        from replicas.experts.timed_transport import TimedTransport
        from replicas.experts.transport_channel import ChannelTransport
        from replicas.experts.transport_ray import RayTransport
        from router.report import ReplicaReportBuilder

        self.spec = spec
        torch.set_num_threads(self.spec.engine.threads)
        dtype = getattr(torch, self.spec.model.dtype)
        device = device_for_gpus(self.spec.attention.num_gpus)
        model = load_model(
            self.spec.model.path, dtype=dtype, device=device, experts="none" if pool else "all"
        )
        self.pool = pool
        self.transport: TimedTransport | None = None
        self.switch: ReplicaSwitch | None = None  # EPLB: follows the pool's placement
        dispatcher = None
        if pool is not None:
            start: PlacementUpdate = await pool.current.remote()
            x = self.spec.experts
            shard_transport = (
                ChannelTransport(start.actors, x.call_timeout_s)
                if x.transport == "channel"
                else RayTransport(start.actors, x.call_timeout_s)
            )
            self.transport = TimedTransport(shard_transport)
            dispatcher = ExpertDispatcher(
                self.transport, start.placement, start.num_experts, ping_pong=self.spec.experts.ping_pong
            )
            self.switch = ReplicaSwitch(shard_transport, dispatcher, start.version)
        tokenizer = Tokenizer.from_dir(self.spec.model.path)
        engine = Engine(model, tokenizer, engine_config(self.spec), dispatcher)
        self.engine = AsyncEngine(engine, self.spec.engine.stream_interval_ms / 1000)
        self.max_streams = self.spec.engine.max_num_seqs + self.spec.engine.max_queued_requests
        layout = engine.kv_cache.layout
        self.report = ReplicaReportBuilder(layout.block_size, layout.window)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = ray_metrics({"replica": self.replica_id})
        self.ttft = TTFTWindow()
        self._recorded = self.engine.snapshot()
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk | Refusal]:
        """The gateway's call: a Serve stream of the engine's chunks, or one `Refusal` first."""
        try:
            async for chunk in self.chunks(request):
                yield chunk
        except EngineError as e:
            yield e.refusal

    async def chunks(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """One request on this replica's engine, timed into its metrics and TTFT window. Raises
        EngineError before the first chunk; closing it early aborts the request."""
        timer = RequestTimer()
        stream = stream_request(self.engine, request, self.max_streams)
        try:
            async for chunk in stream:
                timer.on_chunk(chunk)
                if chunk.finish_reason is not None:
                    record_finished(self.metrics, timer, chunk)
                    if timer.ttft_s is not None:
                        self.ttft.add(timer.ttft_s, time.monotonic())
                yield chunk
        finally:
            await stream.aclose()

    def record_routing_stats(self) -> dict[str, ReplicaReport]:
        snap = self.engine.snapshot()
        self.report.add_events(self.engine.drain_kv_events())
        report = self.report.build(
            num_running=snap.num_running,
            num_waiting=snap.num_waiting,
            kv_usage=snap.kv_usage.get("full", 0.0),
            step_s=snap.step_s,
            prefill_tokens_per_s=snap.prefill_tokens_per_s,
        )
        return routing_stats(report)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the application autoscaling policy reads (cluster.serving.metrics_source STAT_* keys)."""
        snap = self.engine.snapshot()
        stats = {
            "kv_usage": snap.kv_usage.get("full", 0.0),
            "num_waiting": float(snap.num_waiting),
            "num_running": float(snap.num_running),
        }
        p90 = self.ttft.p90(time.monotonic())
        if p90 is not None:
            stats["ttft_p90_s"] = p90
        return stats

    async def _report_loop(self) -> None:
        while True:
            snap, last = self.engine.snapshot(), self._recorded
            self.metrics.engine_state(
                num_running=snap.num_running,
                num_waiting=snap.num_waiting,
                kv_usage={LAYER_TYPES[k]: v for k, v in snap.kv_usage.items()},
            )
            self.metrics.spec_decode(
                num_drafts=snap.num_drafts - last.num_drafts,
                num_draft_tokens=snap.num_drafted_tokens - last.num_drafted_tokens,
                num_accepted_tokens=snap.num_accepted_draft_tokens - last.num_accepted_draft_tokens,
            )
            self.metrics.preempted(snap.num_preemptions - last.num_preemptions)
            for seconds in self.transport.drain_durations() if self.transport else []:
                self.metrics.dispatch(seconds, self.spec.experts.transport)
            self._recorded = snap
            await self._sync_placement()
            await asyncio.sleep(REPORT_PERIOD_S)

    async def _sync_placement(self) -> None:
        """EPLB (`replicas.experts.placement_switch`, step 2): switch to the pool's newer placement; the next
        sync reports the new version, which is the pool's signal that old copies may go."""
        if self.pool is None or self.switch is None:
            return
        try:
            update: PlacementUpdate | None = await self.pool.sync.remote(self.replica_id, self.switch.version)
        except Exception:  # the pool restarting: keep routing by the placement we have
            return
        if update is not None:
            await asyncio.to_thread(self.switch.apply, update)

    def check_health(self) -> None:
        """Serve replaces a replica that fails this: its engine thread stopped, or every engine
        step has failed for a while (`replicas.engine.step_failures`): alive but serving nothing."""
        if not self.engine.is_alive():
            raise RuntimeError("engine thread stopped")
        stuck = self.engine.snapshot().stuck_reason
        if stuck is not None:
            raise RuntimeError(stuck)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
