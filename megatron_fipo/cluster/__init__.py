"""Ray placement (bundles for training ranks and engines), actor groups, the launch dry run.

Ray is imported only when an actor group or placement group is created, so the layout dry run
(``python -m megatron_fipo.cluster.layout``) works without a Ray cluster.
"""

from megatron_fipo.cluster.actor_group import NodeLostError, RayActorGroup, WorkerError, init_ray
from megatron_fipo.cluster.placement import (
    PlacementPlan,
    RayPlacement,
    WorkerSlot,
    create_placement,
    plan_placement,
)

__all__ = [
    "NodeLostError",
    "PlacementPlan",
    "RayActorGroup",
    "RayPlacement",
    "WorkerError",
    "WorkerSlot",
    "create_placement",
    "init_ray",
    "plan_placement",
]
