"""plait-parallel: N-D parallelism for Plait on one ``DeviceMesh``.

Modules, one job each:

``config``          the keys this plugin owns (Axolotl names) and their checks
``mesh``            :func:`~plait_parallel.mesh.build_mesh` and which ranks get which data
``layers``          finding the decoder-layer class (config, family, or heuristic)
``tensor_parallel`` DTensor ``parallelize_module`` with a per-family plan
``fsdp``            FSDP2 ``fully_shard`` per decoder layer and the root
``context_parallel`` sequence sharding and the ``plait_ring`` attention
``wrap``            the order TP -> CP -> FSDP2 that ``wrap_parallel`` applies
``checkpoint``      sharded save/load with ``torch.distributed.checkpoint``, consolidation
``commands``        ``plait merge-sharded``
``equivalence``     a tiny loop that checks a layout trains like one process
``plugin``          the hookimpls the entry point registers

Nothing here imports torch at module level except the modules that need it,
and the entry point (``plugin``) imports none of them eagerly.
"""

__version__ = "0.1.0"
