"""Ray placement: one bundle per GPU (or CPU slot), split between training ranks and engines.

:func:`plan_placement` decides, from the config alone, which bundles the training ranks and the
rollout engines use:

- colocated (``rollout.colocate``): every bundle hosts one training rank *and* a share of an
  engine; the two take fractions of the bundle's GPU (CPU) so Ray admits both, and the engine
  releases its memory while the actor trains;
- disaggregated: the first ``training_world_size`` bundles train, the remaining
  ``rollout.num_gpus`` bundles serve the engines.

Engines span ``rollout.engine_tensor_parallel_size`` consecutive bundles (one node, since
``gpus_per_node`` is a multiple of it). :func:`create_placement` reserves the bundles as a Ray
placement group and orders them by node, so consecutive ranks (a TP group) share a node. Nodes
go in ``NODE_RANK`` order when they carry the resource ``launch/train_32b.sh`` gives each
(``fipo_node_rank_<k>``). :func:`plan_by_node` (the dry run) and
:meth:`RayPlacement.by_node` (the driver) say what each node holds, in the same words
(:func:`node_lines`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_fipo.config import FipoConfig

# Fractions of a bundle when training and rollout share it; they sum to 1 so Ray admits both.
COLOCATED_TRAIN_FRACTION = 0.5
COLOCATED_ENGINE_FRACTION = 0.5
NODE_RANK_RESOURCE = "fipo_node_rank_"
"""Prefix of the Ray resource ``launch/train_32b.sh`` gives node ``k``: ``fipo_node_rank_<k>``."""


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """Which bundles hold what; pure data, no Ray."""

    use_gpu: bool
    num_bundles: int
    cpus_per_bundle: float
    """CPUs reserved with each bundle (GPU runs: host threads per GPU)."""
    train_bundles: tuple[int, ...]
    """Bundle of each training rank, by rank."""
    engine_bundles: tuple[tuple[int, ...], ...]
    """Bundles of each engine (its TP group), by engine."""
    train_fraction: float
    """Share of a bundle's GPU (or CPU) a training rank takes."""
    engine_fraction: float
    """Share of a bundle's GPU (or CPU) an engine actor takes on its first bundle."""

    @property
    def colocated(self) -> bool:
        return bool(self.engine_bundles) and self.engine_bundles[0][0] in self.train_bundles


def plan_placement(config: FipoConfig, cpus_per_gpu: float | None = None) -> PlacementPlan:
    """The bundles of a run (``config.validate_layout`` checks the sizes first). On GPU each
    bundle reserves ``cpus_per_gpu`` CPUs: given, else ``trainer.cpus_per_node`` shared by the
    node's GPUs, else 4."""
    trainer, rollout = config.trainer, config.rollout
    config.validate_layout()
    use_gpu = trainer.gpus_per_node > 0
    train_ranks = config.training_world_size
    engine_tp = rollout.engine_tensor_parallel_size if use_gpu else 1
    if rollout.colocate:
        num_bundles, first_engine_bundle = train_ranks, 0
        fractions = (COLOCATED_TRAIN_FRACTION, COLOCATED_ENGINE_FRACTION)
    else:
        num_bundles, first_engine_bundle = train_ranks + int(rollout.num_gpus or 0), train_ranks
        fractions = (1.0, 1.0)
    engine_starts = range(first_engine_bundle, num_bundles, engine_tp)
    if not use_gpu:
        cpus = (trainer.cpus_per_node or train_ranks) / trainer.cpu_ranks_per_node
    else:
        # trainer.cpus_per_node, when given, is shared by the node's GPUs (bundles).
        cpus = (
            cpus_per_gpu
            if cpus_per_gpu is not None
            else trainer.cpus_per_node / trainer.gpus_per_node
            if trainer.cpus_per_node
            else 4.0
        )
    return PlacementPlan(
        use_gpu=use_gpu,
        num_bundles=num_bundles,
        cpus_per_bundle=float(cpus),
        train_bundles=tuple(range(train_ranks)),
        engine_bundles=tuple(tuple(range(s, s + engine_tp)) for s in engine_starts),
        train_fraction=fractions[0],
        engine_fraction=fractions[1],
    )


@dataclass(frozen=True, slots=True)
class NodeShare:
    """What one node holds: training ranks and engines (by the engine's first bundle)."""

    index: int
    """NODE_RANK (or, for nodes without one, the node's position in the placement)."""
    train_ranks: tuple[int, ...]
    engines: tuple[int, ...]
    address: str = ""
    """The node's address as Ray knows it ("" in the dry run)."""
    node_id: str = ""
    """Ray's node id ("" in the dry run)."""


def _shares(plan: PlacementPlan, node_of_bundle: list[int]) -> dict[int, tuple[list, list]]:
    """{node: (train ranks, engines)} from the node of each plan bundle."""
    shares: dict[int, tuple[list, list]] = {}
    for rank, bundle in enumerate(plan.train_bundles):
        shares.setdefault(node_of_bundle[bundle], ([], []))[0].append(rank)
    for engine, bundles in enumerate(plan.engine_bundles):
        shares.setdefault(node_of_bundle[bundles[0]], ([], []))[1].append(engine)
    return shares


def plan_by_node(plan: PlacementPlan, slots_per_node: int) -> list[NodeShare]:
    """The dry run's placement: nodes filled in order, ``slots_per_node`` bundles each."""
    shares = _shares(plan, [b // slots_per_node for b in range(plan.num_bundles)])
    return [NodeShare(n, tuple(t), tuple(e)) for n, (t, e) in sorted(shares.items())]


def node_lines(nodes: list[NodeShare]) -> list[str]:
    """One line per node, e.g. ``node 1 (10.0.0.2, Ray node 3f2a...): train ranks 8-15,
    engines 2-3`` (the dry run prints the same without the parenthesis)."""
    lines = []
    for node in nodes:
        where = f" ({node.address}, Ray node {node.node_id})" if node.node_id else ""
        lines.append(
            f"node {node.index}{where}: train ranks {_ranges(node.train_ranks)}, "
            f"engines {_ranges(node.engines)}"
        )
    return lines


def _ranges(values: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``; ``()`` -> ``"none"``."""
    if not values:
        return "none"
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def node_rank_of(resources: dict[str, float]) -> int | None:
    """The NODE_RANK a node was started with (its ``fipo_node_rank_<k>`` resource), if any."""
    for name in resources:
        if name.startswith(NODE_RANK_RESOURCE):
            return int(name[len(NODE_RANK_RESOURCE) :])
    return None


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Where one Ray actor goes and what it asks for."""

    bundle_index: int
    num_cpus: float
    num_gpus: float
    gpu_ids: tuple[int, ...] = ()
    """Node-local GPU ids of the slot's bundles (an engine: its whole TP group); () on CPU."""


@dataclass(slots=True)
class RayPlacement:
    """A reserved placement group and the plan's bundles mapped onto it (node, GPU order)."""

    placement_group: Any
    plan: PlacementPlan
    bundle_order: list[int]
    """``bundle_order[i]`` is the Ray bundle index of the plan's bundle ``i``."""
    bundle_gpu: dict[int, int]
    """Node-local GPU id of each Ray bundle (empty on CPU)."""
    bundle_node: dict[int, str] = field(default_factory=dict)
    """Ray node id of each Ray bundle."""
    nodes: list[dict[str, Any]] = field(default_factory=list)
    """``ray.nodes()`` entries of the nodes holding bundles, in placement order."""

    def by_node(self) -> list[NodeShare]:
        """What each node holds; nodes named by NODE_RANK when every one carries it."""
        position = {node["NodeID"]: i for i, node in enumerate(self.nodes)}
        node_of_bundle = [position[self.bundle_node[b]] for b in self.bundle_order]
        ranks = [node_rank_of(node["Resources"]) for node in self.nodes]
        named = None not in ranks and len(set(ranks)) == len(ranks)
        out = []
        for i, (train, engines) in sorted(_shares(self.plan, node_of_bundle).items()):
            node = self.nodes[i]
            index = ranks[i] if named else i
            out.append(
                NodeShare(
                    index, tuple(train), tuple(engines), node["NodeManagerAddress"], node["NodeID"]
                )
            )
        return out

    def train_slots(self) -> list[WorkerSlot]:
        """One slot per training rank, in rank order."""
        return [self._slot((b,), self.plan.train_fraction) for b in self.plan.train_bundles]

    def engine_slots(self) -> list[WorkerSlot]:
        """One slot per engine on its first bundle; ``gpu_ids`` lists all its TP bundles' GPUs."""
        return [self._slot(group, self.plan.engine_fraction) for group in self.plan.engine_bundles]

    def _slot(self, plan_bundles: tuple[int, ...], fraction: float) -> WorkerSlot:
        bundles = [self.bundle_order[b] for b in plan_bundles]
        cpus = self.plan.cpus_per_bundle * fraction
        gpus = fraction if self.plan.use_gpu else 0.0
        gpu_ids = tuple(self.bundle_gpu[b] for b in bundles) if self.bundle_gpu else ()
        return WorkerSlot(bundles[0], cpus, gpus, gpu_ids)


def _probe_bundles(group: Any, num_bundles: int) -> list[tuple[str, int]]:
    """(node id, GPU id) of every bundle, from a tiny actor scheduled on each."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=0.01)
    class _Probe:
        def where(self) -> tuple[str, int]:
            return ray.get_runtime_context().get_node_id(), int(ray.get_gpu_ids()[0])

    probes = [
        _Probe.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index
            )
        ).remote()
        for index in range(num_bundles)
    ]
    try:
        return ray.get([probe.where.remote() for probe in probes])
    finally:
        for probe in probes:
            ray.kill(probe)


def create_placement(plan: PlacementPlan, timeout_s: float = 120.0) -> RayPlacement:
    """Reserve the plan's bundles (Ray must be initialised); fails naming what was missing.

    Bundles are ordered by node, then (on GPU) by GPU id, so consecutive ranks share a node and
    an engine's TP bundles are neighbouring GPUs.
    """
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    bundle = {"CPU": plan.cpus_per_bundle, **({"GPU": 1.0} if plan.use_gpu else {})}
    group = placement_group([dict(bundle) for _ in range(plan.num_bundles)], strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise RuntimeError(
            f"could not reserve {plan.num_bundles} bundles of {bundle} within {timeout_s:.0f} s; "
            f"the cluster has {ray.cluster_resources()} (available {ray.available_resources()})"
        )
    if plan.use_gpu:
        located = _probe_bundles(group, plan.num_bundles)
        nodes = {b: node for b, (node, _) in enumerate(located)}
        gpus = {b: gpu for b, (_, gpu) in enumerate(located)}
    else:
        nodes, gpus = placement_group_table(group)["bundles_to_node_id"], {}
    info = {node["NodeID"]: node for node in ray.nodes()}
    used = list(dict.fromkeys(nodes[b] for b in sorted(nodes)))  # by first bundle
    ranks = {n: node_rank_of(info[n]["Resources"]) for n in used}
    used.sort(key=lambda n: (ranks[n] is None, ranks[n] or 0))  # NODE_RANK order, unranked last
    node_rank = {node: i for i, node in enumerate(used)}
    order = sorted(range(plan.num_bundles), key=lambda b: (node_rank[nodes[b]], gpus.get(b, b)))
    return RayPlacement(
        placement_group=group,
        plan=plan,
        bundle_order=order,
        bundle_gpu=gpus,
        bundle_node=dict(nodes),
        nodes=[info[n] for n in used],
    )
