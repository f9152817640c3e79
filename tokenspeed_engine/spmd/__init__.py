"""Local SPMD: placements at module boundaries, a static compiler that inserts the collectives.

``placement`` and ``groups`` are imported here; the compiler and the collectives live in
``tokenspeed_engine.spmd.compiler`` / ``.collectives`` (not imported eagerly, because the
layers import the placements and the compiler imports the layers).
"""

from tokenspeed_engine.spmd.groups import ParallelConfig, ParallelContext, ParallelGroup
from tokenspeed_engine.spmd.placement import Layout, Partial, Placement, Replicate, Shard

__all__ = [
    "Layout",
    "ParallelConfig",
    "ParallelContext",
    "ParallelGroup",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
]
