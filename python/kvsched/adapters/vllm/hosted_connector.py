"""vLLM's own KV connectors under kvsched's scheduling: the scheduler side of the connector protocol.

With ``--kv-transfer-config`` naming a connector other than kvsched's, the adapter builds its
scheduler side (``KVConnectorFactory``, role SCHEDULER) and calls it as vLLM's scheduler does, on
the contract below; its worker side runs in vLLM's workers unchanged.

  added        ``on_new_request``, then ``get_num_new_matched_tokens(request, 0)``: the prompt tokens
               the connector can load (0 for a request that must not read cached KV, e.g. one asking
               for prompt logprobs). They go to the core as the request's ``external_tokens``; at
               admission the core counts them computed past its own hits (device, host tier), in
               fresh blocks, and the plan lists the load (``external_load_ids``/``external_load_tokens``).
  admitted     for a request the plan loads for: ``get_num_new_matched_tokens(request, local hit)``
               again, as vLLM asks it at admission, which must offer exactly what the core loads
               (else the engine stops with an error: the plan would run on KV nobody loads); then,
               for every request that starts or restarts in the step,
               ``update_state_after_alloc(request, blocks, num_external_tokens)`` (0 without a load),
               blocks being its whole table in vLLM's ids. A request recomputed after a preemption
               is asked again when it restarts.
  each step    ``build_connector_meta(scheduler_output)`` into ``kv_connector_metadata``;
               ``has_sync_kv_loads`` when the step loads, so the workers load before the forward pass.
  output       ``update_connector_output`` with the workers' ``kv_connector_output``.
  finished     ``request_finished(request, [])``.

What is not offered, and what happens instead (never silently wrong):
  - asynchronous loads (``load_kv_async``) and hits not known yet (None): the request computes its
    prompt (no external tokens); the connector is told of no load.
  - delayed frees (``request_finished`` returning True: the connector still reads the blocks, as
    disaggregated prefill's producers do): kvsched frees a finished request's blocks at once, so
    the engine stops with an error naming the connector.
  - block ids in ``request_finished``: the core freed them already, so the connector is given none
    (a connector that saves a request's blocks when it finishes saves nothing); its
    ``kv_transfer_params`` are not passed on to the request's output.
  - blocks that failed to load (``invalid_block_ids``): the engine stops with an error.
  - the hits are asked once, when the request is added (num_computed_tokens = 0): a connector whose
    answer depends on the device's prefix cache loads what the device already holds, which is
    correct, only wasted.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from . import versions
from .connector import is_kvsched_connector


class _Blocks:
    """The ``KVCacheBlocks`` face connectors read in ``update_state_after_alloc``."""

    def __init__(self, block_ids: list[int]) -> None:
        self._block_ids = block_ids

    def get_block_ids(self, allow_none: bool = False) -> tuple[list[int], ...]:
        return (self._block_ids,)

    def get_unhashed_block_ids(self) -> list[int]:
        return list(self._block_ids)


class HostedConnector:
    """A vLLM connector's scheduler side, driven by the adapter (see the module docstring)."""

    @classmethod
    def create(cls, vllm_config: Any, kv_cache_config: Any) -> "HostedConnector | None":
        transfer = vllm_config.kv_transfer_config
        if transfer is None or is_kvsched_connector(transfer):
            return None
        return cls(KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config))

    def __init__(self, connector: Any) -> None:
        self.connector = connector
        self.name = type(connector).__name__
        self._known: set[str] = set()  # requests the connector was told of (on_new_request)

    def added(self, request: Any) -> int:
        """The prompt tokens the connector can load for a new request (0: none, or not offered)."""
        self.connector.on_new_request(request)
        self._known.add(request.request_id)
        if not versions.reads_prefix_cache(request):
            return 0
        tokens, load_async = self.connector.get_num_new_matched_tokens(request, 0)
        if tokens is None or load_async or tokens <= 0:
            return 0
        return min(int(tokens), request.num_prompt_tokens - 1)

    def admitted(self, request: Any, block_ids: list[int], num_external_tokens: int, num_local_tokens: int) -> None:
        """A request starts or restarts with ``num_local_tokens`` found in kvsched's caches and
        ``num_external_tokens`` more the connector loads."""
        if num_external_tokens:
            tokens, load_async = self.connector.get_num_new_matched_tokens(request, num_local_tokens)
            if tokens != num_external_tokens or load_async:
                raise RuntimeError(
                    f"KV connector {self.name}: request {request.request_id} was admitted to load "
                    f"{num_external_tokens} tokens past its {num_local_tokens} cached ones, but the connector now "
                    f"offers {tokens}{' asynchronously' if load_async else ''}")
        self.connector.update_state_after_alloc(request, _Blocks(block_ids), num_external_tokens)

    def metadata(self, output: Any, loads: bool) -> None:
        output.kv_connector_metadata = self.connector.build_connector_meta(output)
        if loads:
            output.has_sync_kv_loads = True

    def reported(self, model_runner_output: Any) -> None:
        out = getattr(model_runner_output, "kv_connector_output", None)
        if out is None:
            return
        if out.invalid_block_ids:
            raise RuntimeError(f"KV connector {self.name}: blocks {sorted(out.invalid_block_ids)} failed to load; "
                               "kvsched's adapter cannot recompute them")
        self.connector.update_connector_output(out)

    def finished(self, request: Any) -> None:
        if request.request_id not in self._known:
            return  # refused or aborted before the connector heard of it
        self._known.discard(request.request_id)
        delay_free, _params = self.connector.request_finished(request, [])
        if delay_free:
            raise RuntimeError(f"KV connector {self.name} keeps the blocks of finished request {request.request_id} "
                               "(asynchronous saves, disaggregated prefill): kvsched's adapter frees them at finish")

    def shutdown(self) -> None:
        self.connector.shutdown()
