"""kvtier as a vLLM ``OffloadingSpec`` (0.33, and 0.32 with its CPU build), loaded by vLLM's own
``OffloadingConnector``, with G2, G3 and G4.

``--kv-transfer-config '{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":
{"spec_name":"KvtierOffloadingSpec","spec_module_path":"kvtier.integrations.vllm","host_capacity_bytes":"8GiB",
"disk_path":"/mnt/nvme/kvtier","disk_capacity_bytes":"500GiB","remote_url":"redis://cache:6379/0"}}'``

G2 is shared memory: one part per worker rank (``/dev/shm/kvtier-<engine id>-rank<r>``), mapped by the
scheduler process and by that rank's worker, whichever comes first creating it; the second to map it unlinks
the name, so nothing is left behind however the processes end. Workers pin their part (``cudaHostRegister``)
when CUDA exists.

The package is split by process: ``spec`` (what vLLM loads, in every process), ``scheduler`` (the
scheduler-side manager), ``worker`` (each rank's copies), ``ranks`` (one lower-tier entry per rank).

Agent hints ride in a request's ``kv_transfer_params["agent_hints"]`` (vLLM passes them to the manager
verbatim); bad hints are logged and ignored, never raised into the serving loop. A request whose hints say
the session returns (``prefetch`` or ``next_call_delay_s``) has its chunks held only below G2 promoted when
it finishes, so the next call finds them in G2. KV events go through vLLM's
own event path: G2 chunks with medium ``CPU``, G3/G4 chunks with medium ``STORAGE``, removals included.
"""

from kvtier.integrations.vllm.spec import KvtierOffloadingSpec

__all__ = ["KvtierOffloadingSpec"]
