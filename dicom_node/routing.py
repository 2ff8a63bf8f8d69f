"""Routing rules: which complete series get an sCT, and where it goes.

Scanners auto-send every series of an exam (localizers, diffusion, perfusion, maps...), so the
rules say which ones are wanted; everything else is "not routed", with the reason audited.
Rules are tried in order and the first that matches decides (like a firewall: predictable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dicom_node.config import Route


@dataclasses.dataclass(frozen=True)
class RoutingDecision:
    route_name: str | None  # None: not routed
    destinations: tuple[str, ...]
    reason: str

    @property
    def routed(self) -> bool:
        return self.route_name is not None


def decide(
    routes: Sequence[Route], *, series_description: str, protocol_name: str, calling_aet: str
) -> RoutingDecision:
    """The first route that matches the series, or a "not routed" decision saying why none did."""
    texts = [t for t in (series_description, protocol_name) if t]
    reasons: list[str] = []
    for route in routes:
        if not route.calling_aet_pattern.fullmatch(calling_aet):
            reasons.append(f"{route.name}: calling AE title {calling_aet!r} does not match")
            continue
        if not any(route.description_pattern.search(text) for text in texts):
            reasons.append(f"{route.name}: SeriesDescription/ProtocolName do not match the description pattern")
            continue
        if route.exclude_pattern is not None:
            vetoed_by = next((text for text in texts if route.exclude_pattern.search(text)), None)
            if vetoed_by is not None:
                reasons.append(f"{route.name}: excluded ({route.exclude_pattern.search(vetoed_by).group(0)!r})")  # type: ignore[union-attr]
                continue
        return RoutingDecision(route.name, route.destinations, f"matched route {route.name}")
    return RoutingDecision(None, (), "no route matches: " + "; ".join(reasons))
