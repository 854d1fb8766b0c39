"""The routing table as plain types: owned by the registry, served from by the routers.

Conversions to and from protobuf (the watch stream) and JSON (the router's on-disk cache) live
here so both sides agree on one shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from services.common.api import routing_pb2

STABLE_VARIANT = "stable"
HOLDOUT_VARIANT = "holdout"


@dataclass(frozen=True, slots=True)
class RouteTarget:
    triton_model: str
    triton_version: str = ""
    model_version: str = ""


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    target: RouteTarget
    weight: float


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    salt: str
    variants: tuple[Variant, ...]
    holdout_fraction: float = 0.0


@dataclass(frozen=True, slots=True)
class Shadow:
    name: str
    target: RouteTarget
    fraction: float = 1.0


@dataclass(frozen=True, slots=True)
class ModelRoute:
    model: str
    kind: str
    stable: RouteTarget
    experiment: Experiment | None = None
    shadows: tuple[Shadow, ...] = ()

    def targets(self) -> list[RouteTarget]:
        """Every deployed model this route may call (stable, variants, shadows)."""
        found = [self.stable]
        if self.experiment is not None:
            found.extend(v.target for v in self.experiment.variants)
        found.extend(s.target for s in self.shadows)
        unique: list[RouteTarget] = []
        for target in found:
            if target not in unique:
                unique.append(target)
        return unique


@dataclass(frozen=True, slots=True)
class RouteTable:
    version: int = 0
    routes: tuple[ModelRoute, ...] = field(default_factory=tuple)

    def route(self, model: str) -> ModelRoute | None:
        for route in self.routes:
            if route.model == model:
                return route
        return None


def _target_to_proto(target: RouteTarget) -> routing_pb2.RouteTarget:
    return routing_pb2.RouteTarget(
        triton_model=target.triton_model,
        triton_version=target.triton_version,
        model_version=target.model_version,
    )


def _target_from_proto(msg: routing_pb2.RouteTarget) -> RouteTarget:
    return RouteTarget(msg.triton_model, msg.triton_version, msg.model_version)


def table_to_proto(table: RouteTable) -> routing_pb2.RoutingTable:
    msg = routing_pb2.RoutingTable(version=table.version)
    for route in table.routes:
        r = msg.routes.add(model=route.model, kind=route.kind)
        r.stable.CopyFrom(_target_to_proto(route.stable))
        if route.experiment is not None:
            exp = route.experiment
            r.experiment.name = exp.name
            r.experiment.salt = exp.salt
            r.experiment.holdout_fraction = exp.holdout_fraction
            for variant in exp.variants:
                r.experiment.variants.add(
                    name=variant.name, target=_target_to_proto(variant.target), weight=variant.weight
                )
        for shadow in route.shadows:
            r.shadows.add(name=shadow.name, target=_target_to_proto(shadow.target), fraction=shadow.fraction)
    return msg


def table_from_proto(msg: routing_pb2.RoutingTable) -> RouteTable:
    routes = []
    for r in msg.routes:
        experiment = None
        if r.HasField("experiment") and r.experiment.variants:
            experiment = Experiment(
                name=r.experiment.name,
                salt=r.experiment.salt,
                variants=tuple(
                    Variant(v.name, _target_from_proto(v.target), v.weight) for v in r.experiment.variants
                ),
                holdout_fraction=r.experiment.holdout_fraction,
            )
        shadows = tuple(Shadow(s.name, _target_from_proto(s.target), s.fraction) for s in r.shadows)
        routes.append(ModelRoute(r.model, r.kind, _target_from_proto(r.stable), experiment, shadows))
    return RouteTable(msg.version, tuple(routes))


def table_to_dict(table: RouteTable) -> dict[str, Any]:
    return asdict(table)


def table_from_dict(data: dict[str, Any]) -> RouteTable:
    routes = []
    for r in data.get("routes", []):
        exp = r.get("experiment")
        experiment = None
        if exp:
            experiment = Experiment(
                name=exp["name"],
                salt=exp["salt"],
                variants=tuple(
                    Variant(v["name"], RouteTarget(**v["target"]), float(v["weight"])) for v in exp["variants"]
                ),
                holdout_fraction=float(exp.get("holdout_fraction", 0.0)),
            )
        shadows = tuple(
            Shadow(s["name"], RouteTarget(**s["target"]), float(s.get("fraction", 1.0))) for s in r.get("shadows", [])
        )
        routes.append(ModelRoute(r["model"], r["kind"], RouteTarget(**r["stable"]), experiment, shadows))
    return RouteTable(int(data.get("version", 0)), tuple(routes))
