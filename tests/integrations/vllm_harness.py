"""Drive vLLM 0.33's real scheduler and OffloadingConnector on CPU.

The harness builds the objects vLLM's engine core builds (VllmConfig from a local OPT config,
KVCacheConfig from vLLM's own planner, Scheduler with the connector named in kv_transfer_config),
then steps requests through ``schedule()`` / ``update_from_output()`` with fabricated model outputs.
Every connector decision (load jobs, store jobs, KV events) is recorded so tests can assert on it.

Optionally the worker side runs too: a second OffloadingConnector in the WORKER role is given CPU KV
caches allocated by vLLM's ``allocate_kv_cache`` in the layout the connector asks for (LBHNC), and is
driven in the model runner's order (bind metadata, start_load_kv, forward, wait_for_save,
get_finished, build_connector_worker_meta). Without it, every job is reported done in the step it
was issued, which is what a worker that finishes within a step would report.

With ``tensor_parallel_size > 1`` the VllmConfig carries vLLM's own ParallelConfig, the scheduler side
sees that world size, and one worker connector per rank (its VllmConfig with that rank) runs over its own
KV caches holding different bytes; their outputs are combined by vLLM's ``KVOutputAggregator``, as the
multiprocess executor combines them.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (  # noqa: E402
    OffloadingConnectorMetadata,
    OffloadingWorkerMetadata,
    TransferJob,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (  # noqa: E402
    OffloadingConnector,
)
from vllm.platforms import current_platform  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.attention.backends.utils import resolve_kv_cache_layout  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
try:  # vLLM 0.33
    from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs  # noqa: E402
except ImportError:  # vLLM 0.32 (its CPU build): the same planning in kv_cache_utils, groups derived inside
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs as _configs_0_32  # noqa: E402

    def get_global_kv_cache_groups(vllm_config, specs):  # noqa: ARG001 - 0.32 derives the groups itself
        return None

    def get_kv_cache_configs(vllm_config, specs, memory, groups):  # noqa: ARG001
        return _configs_0_32(vllm_config, specs, memory)
from vllm.v1.core.kv_cache_utils import (  # noqa: E402
    generate_scheduler_kv_cache_config,
    get_request_block_hasher,
    init_none_hash,
)
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.kv_offload.base import OffloadingManager  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402


@contextlib.contextmanager
def hybrid_kv_cache_supported() -> Iterator[None]:
    """The CPU platform denies the hybrid KV cache manager; OffloadingConnector needs it (SupportsHMA)."""
    with mock.patch.object(
        type(current_platform), "support_hybrid_kv_cache", return_value=True, create=True
    ):
        yield


@dataclass(frozen=True)
class ModelShape:
    """Attention geometry of the fabricated model; small so a test allocates kilobytes."""

    num_layers: int = 2
    num_kv_heads: int = 2
    head_size: int = 8
    dtype: torch.dtype = torch.float16

    def layer_names(self) -> list[str]:
        return [f"model.layers.{i}.self_attn.attn" for i in range(self.num_layers)]


@dataclass
class StepRecord:
    """What the connector decided in one engine step."""

    scheduled_tokens: dict[str, int]
    load_jobs: dict[int, TransferJob]
    store_jobs: dict[int, TransferJob]
    # Tokens found in vLLM's own GPU prefix cache, per newly scheduled request.
    local_hits: dict[str, int]
    # Tokens the connector offered to load beyond those (get_num_new_matched_tokens), per request.
    offload_hits: dict[str, int]
    events: list[Any] = field(default_factory=list)
    # Every manager.lookup answer of the step, in call order: (request id, LookupResult name).
    lookups: list[tuple[str, str]] = field(default_factory=list)
    # Requests vLLM preempted in this step (their blocks freed; they resume later).
    preempted: set[str] = field(default_factory=set)

    @property
    def stored_events(self) -> list[BlockStored]:
        return [e for e in self.events if isinstance(e, BlockStored)]

    @property
    def removed_events(self) -> list[BlockRemoved]:
        return [e for e in self.events if isinstance(e, BlockRemoved)]


class _RecordingPublisher:
    """Stands where vLLM's event publisher stands, keeping each published batch."""

    def __init__(self) -> None:
        self.batches: list[KVEventBatch] = []

    def publish(self, batch: KVEventBatch) -> None:
        self.batches.append(batch)

    def shutdown(self) -> None:
        return

    def get_publisher_config(self) -> None:
        return None


class VllmSchedulerHarness:
    """A real vLLM Scheduler with the real OffloadingConnector and a spec chosen by extra config.

    ``extra_config`` is ``kv_connector_extra_config`` verbatim (``spec_name``, ``spec_module_path``
    and the spec's own keys). ``with_worker=True`` also builds the worker-role connector over CPU
    KV caches; otherwise jobs are reported complete in the step that issued them.
    """

    def __init__(
        self,
        extra_config: dict[str, Any],
        *,
        block_size: int = 16,
        num_gpu_blocks: int = 64,
        max_model_len: int = 512,
        shape: ModelShape = ModelShape(),
        with_worker: bool = False,
        kv_events: bool = True,
        model_dir: str | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        self.block_size = block_size
        self.tensor_parallel_size = tensor_parallel_size
        self.shape = shape
        self._num_gpu_blocks = num_gpu_blocks
        self._tmp = None if model_dir else tempfile.TemporaryDirectory(prefix="kvtier-opt-")
        self.model_dir = model_dir or self._tmp.name
        transformers.OPTConfig().save_pretrained(self.model_dir)
        init_none_hash(sha256)
        self._block_hasher = get_request_block_hasher(block_size, sha256)
        with hybrid_kv_cache_supported():
            self.vllm_config = self._build_vllm_config(extra_config, max_model_len, kv_events)
            self.kv_cache_config = self._build_kv_cache_config()
            scheduler_kv_cache_config = generate_scheduler_kv_cache_config([self.kv_cache_config])
            # The engine core records the planned block count here before building the scheduler.
            self.vllm_config.cache_config.num_gpu_blocks = scheduler_kv_cache_config.num_blocks
            self.scheduler = Scheduler(
                vllm_config=self.vllm_config,
                kv_cache_config=scheduler_kv_cache_config,
                structured_output_manager=StructuredOutputManager(self.vllm_config),
                block_size=block_size,
                log_stats=True,
            )
            # one worker connector and its KV caches per rank; rank 0's are also worker_connector / kv_caches
            self.rank_workers: list[OffloadingConnector] = []
            self.rank_kv_caches: list[dict[str, torch.Tensor]] = []
            if with_worker:
                for rank in range(tensor_parallel_size):
                    self._build_worker(rank)
            self._aggregator = KVOutputAggregator.from_connector(self.connector, tensor_parallel_size)
        self._offload_hits: dict[str, int] = {}
        self._offloaded_tokens: dict[str, int] = {}
        self._lookups: list[tuple[str, str]] = []
        self._record_offload_hits()
        self._record_lookups()
        self._publisher = _RecordingPublisher()
        self.scheduler.kv_event_publisher = self._publisher
        self.steps: list[StepRecord] = []
        self._requests: dict[str, Request] = {}
        # Fills GPU blocks the fabricated forward pass "computes"; tests may replace it.
        self.write_kv: Callable[[int, int, int], None] = self._write_pattern

    # ----- construction -------------------------------------------------------------------

    def _build_vllm_config(
        self, extra_config: dict[str, Any], max_model_len: int, kv_events: bool
    ) -> VllmConfig:
        model_config = ModelConfig(
            model=self.model_dir,
            tokenizer=self.model_dir,
            skip_tokenizer_init=True,
            max_model_len=max_model_len,
            dtype=self.shape.dtype,
        )
        return VllmConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=True,
                num_gpu_blocks_override=self._num_gpu_blocks,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=16,
                max_num_batched_tokens=max_model_len,
                max_model_len=max_model_len,
                is_encoder_decoder=False,
            ),
            kv_transfer_config=KVTransferConfig(
                kv_connector="OffloadingConnector",
                kv_role="kv_both",
                kv_connector_extra_config=dict(extra_config),
            ),
            kv_events_config=KVEventsConfig(enable_kv_cache_events=kv_events, publisher="null")
            if kv_events
            else None,
            device_config=DeviceConfig("cpu"),
            parallel_config=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                           distributed_executor_backend="mp"),
        )

    def _build_kv_cache_config(self) -> KVCacheConfig:
        """Plan the KV cache with vLLM's own planner, as the engine core does after profiling."""
        spec = FullAttentionSpec(
            block_size=self.block_size,
            num_kv_heads=self.shape.num_kv_heads,
            head_size=self.shape.head_size,
            dtype=self.shape.dtype,
        )
        specs = {name: spec for name in self.shape.layer_names()}
        # A backend with no layout preference: the connector's required layout (LBHNC) wins.
        self.kv_cache_layout = resolve_kv_cache_layout(
            self.vllm_config, [[layout.name for layout in KVCacheLayout]], specs.values()
        )
        groups = get_global_kv_cache_groups(self.vllm_config, [specs])
        memory = self._num_gpu_blocks * spec.page_size_bytes * len(specs)
        (config,) = get_kv_cache_configs(self.vllm_config, [specs], [memory], groups)
        config.kv_cache_layout = self.kv_cache_layout.name
        return config

    def _build_worker(self, rank: int) -> None:
        config = self.vllm_config
        if rank:  # what the executor hands each worker process: the same config with its own rank
            config = copy.deepcopy(config)
            config.parallel_config.rank = rank
        kv_caches = allocate_kv_cache(self.kv_cache_config, torch.device("cpu"), self.kv_cache_layout)
        worker = OffloadingConnector(config, KVConnectorRole.WORKER, self.kv_cache_config)
        worker.register_kv_caches(kv_caches)
        self.rank_workers.append(worker)
        self.rank_kv_caches.append(kv_caches)

    @property
    def worker_connector(self) -> OffloadingConnector | None:
        return self.rank_workers[0] if self.rank_workers else None

    @property
    def kv_caches(self) -> dict[str, torch.Tensor]:
        return self.rank_kv_caches[0]

    def _record_offload_hits(self) -> None:
        """Keep what the connector answers the scheduler about each request's loadable tokens."""
        connector = self.connector
        ask = connector.get_num_new_matched_tokens

        def recorded(request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
            num_tokens, load_async = ask(request, num_computed_tokens)
            if num_tokens:
                self._offload_hits[request.request_id] = num_tokens
                self._offloaded_tokens[request.request_id] = num_tokens
            return num_tokens, load_async

        connector.get_num_new_matched_tokens = recorded  # type: ignore[method-assign]

    def _record_lookups(self) -> None:
        """Keep every answer of the manager's lookup (HIT_PENDING / RETRY only show here)."""
        manager = self.manager
        lookup = manager.lookup

        def recorded(key: Any, req_context: Any) -> Any:
            result = lookup(key, req_context)
            self._lookups.append((req_context.req_id, result.name))
            return result

        manager.lookup = recorded  # type: ignore[method-assign]

    def drop_gpu_prefix_cache(self) -> None:
        """Forget vLLM's GPU prefix cache (not the connector's), so later hits must come from offload."""
        assert self.scheduler.reset_prefix_cache(reset_connector=False)

    # ----- accessors ----------------------------------------------------------------------

    @property
    def connector(self) -> OffloadingConnector:
        connector = self.scheduler.get_kv_connector()
        assert isinstance(connector, OffloadingConnector)
        return connector

    @property
    def manager(self) -> OffloadingManager:
        return self.connector.scheduler.manager

    def request(self, req_id: str) -> Request:
        return self._requests[req_id]

    def block_bytes(self, layer: str, block_id: int, rank: int = 0) -> torch.Tensor:
        """The bytes of one GPU block of one layer on one rank, as the model sees them."""
        return self.rank_kv_caches[rank][layer][block_id].contiguous().view(torch.uint8).flatten()

    # ----- driving ------------------------------------------------------------------------

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        *,
        max_tokens: int = 1,
        kv_transfer_params: dict[str, Any] | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        if kv_transfer_params is not None:  # where the OpenAI server puts them; Request reads them back
            params.extra_args = {"kv_transfer_params": kv_transfer_params}
        request = Request(
            request_id=req_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            pooling_params=None,
            cache_salt=cache_salt,
            block_hasher=self._block_hasher,
        )
        self._requests[req_id] = request
        self.scheduler.add_request(request)
        return request

    def step(self) -> StepRecord:
        output = self.scheduler.schedule()
        meta = output.kv_connector_metadata
        assert isinstance(meta, OffloadingConnectorMetadata)
        record = StepRecord(
            scheduled_tokens=dict(output.num_scheduled_tokens),
            load_jobs=dict(meta.load_jobs),
            store_jobs=dict(meta.store_jobs),
            local_hits={
                r.req_id: r.num_computed_tokens - self._offloaded_tokens.get(r.req_id, 0)
                for r in output.scheduled_new_reqs
            },
            offload_hits=dict(self._offload_hits),
            lookups=list(self._lookups),
            preempted=set(output.preempted_req_ids or ()),
        )
        self._offload_hits.clear()
        self._lookups.clear()
        if self.rank_workers:
            model_output = self._aggregator.aggregate(
                [self._model_output(output, out) for out in self._run_workers(output, meta)])
        else:
            model_output = self._model_output(output, self._complete_all(meta))
        batches_before = len(self._publisher.batches)
        self.scheduler.update_from_output(output, model_output)
        for batch in self._publisher.batches[batches_before:]:
            record.events.extend(batch.events)
        self.steps.append(record)
        return record

    def run(self, max_steps: int = 64, idle_timeout_s: float = 30.0,
            each_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
        """Step until no request is waiting or running and no transfer is in flight; ``each_step`` sees every
        step as it ends (while its blocks still hold what it loaded).

        Steps that schedule nothing (a lookup was deferred: the connector waits for an asynchronous
        promotion) do not count towards ``max_steps``; they are spaced by a millisecond, up to
        ``idle_timeout_s`` in all.
        """
        records: list[StepRecord] = []
        busy_steps, deadline = 0, time.monotonic() + idle_timeout_s
        while busy_steps < max_steps:
            records.append(self.step())
            if each_step is not None:
                each_step(records[-1])
            if not self.scheduler.has_requests() and not self.connector.has_pending_push_work():
                return records
            if records[-1].scheduled_tokens or records[-1].load_jobs or records[-1].store_jobs:
                busy_steps += 1
            elif time.monotonic() > deadline:
                raise AssertionError(f"scheduler made no progress for {idle_timeout_s} s")
            else:
                time.sleep(0.001)
        raise AssertionError(f"scheduler still busy after {max_steps} steps")

    # ----- fabricated worker and model ----------------------------------------------------

    @staticmethod
    def _complete_all(meta: OffloadingConnectorMetadata) -> KVConnectorOutput:
        done = OffloadingWorkerMetadata()
        for job_id in (*meta.load_jobs, *meta.store_jobs):
            done.mark_completed(job_id)
        loaded = {job.req_id for job in meta.load_jobs.values() if not getattr(job, "sync", False)}  # 0.32: none sync
        return KVConnectorOutput(finished_recving=loaded, kv_connector_worker_meta=done)

    def _run_workers(
        self, output: SchedulerOutput, meta: OffloadingConnectorMetadata
    ) -> list[KVConnectorOutput]:
        """Every rank's connector calls around one forward pass, in the model runner's order
        (kv_connector_model_runner_mixin): transfers a step submits in ``start_load_kv`` (the previous
        step's stores among them) read and write blocks before this step's forward pass reuses them."""
        for worker in self.rank_workers:
            if meta.jobs_to_flush:
                worker.handle_preemptions(meta)
            worker.bind_connector_metadata(meta)
            worker.start_load_kv(None)
        self._forward(output)
        outputs = []
        for worker in self.rank_workers:
            worker.wait_for_save()
            _, finished_recving = worker.get_finished(output.finished_req_ids)
            outputs.append(KVConnectorOutput(finished_recving=finished_recving,
                                             kv_connector_worker_meta=worker.build_connector_worker_meta()))
            worker.clear_connector_metadata()
        return outputs

    def _forward(self, output: SchedulerOutput) -> None:
        """Write KV for the scheduled tokens into their GPU blocks, as attention would.

        schedule() has already advanced num_computed_tokens past the scheduled tokens.
        """
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            request = self._requests[req_id]
            block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            first = (request.num_computed_tokens - num_tokens) // self.block_size
            last = (request.num_computed_tokens - 1) // self.block_size
            for block_idx in range(first, last + 1):
                for rank in range(self.tensor_parallel_size):
                    self.write_kv(block_ids[block_idx], block_idx, rank)

    def _write_pattern(self, block_id: int, block_idx: int, rank: int) -> None:
        """Deterministic per (block position, layer, rank) bytes, so a bad load shows as a mismatch."""
        for layer_idx, name in enumerate(self.shape.layer_names()):
            view = self.rank_kv_caches[rank][name][block_id].view(torch.uint8)
            seed = (block_idx * 131 + layer_idx * 7919 + rank * 53) % 251
            view.copy_(
                (torch.arange(view.numel(), dtype=torch.int32) * 31 + seed)
                .remainder(256)
                .to(torch.uint8)
                .reshape(view.shape)
            )

    def _model_output(
        self, output: SchedulerOutput, connector_output: KVConnectorOutput
    ) -> ModelRunnerOutput:
        """One sampled token for each request whose prompt is fully computed after this step."""
        req_ids = list(output.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            request = self._requests[req_id]
            sampled.append([7] if request.num_computed_tokens >= request.num_tokens else [])
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            kv_connector_output=connector_output,
        )

    def close(self) -> None:
        for worker in self.rank_workers:
            worker.shutdown()
        self.scheduler.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()
