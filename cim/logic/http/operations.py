"""Every operation of the logic service, in the order its OpenAPI document lists them."""

from __future__ import annotations

from cim.logic.features import LogicFeatures
from cim.logic.http.accounts import account_endpoints
from cim.logic.http.api import LogicEndpoint
from cim.logic.http.bindings import binding_endpoints
from cim.logic.http.contacts import contact_endpoints
from cim.logic.http.fences import fence_endpoints
from cim.logic.http.posts import post_endpoints
from cim.logic.http.sos import sos_endpoints

__all__ = ["logic_endpoints"]


def logic_endpoints(features: LogicFeatures) -> list[LogicEndpoint]:
    return [
        *account_endpoints(features.accounts),
        *binding_endpoints(features.bindings),
        *contact_endpoints(features.contacts),
        *sos_endpoints(features.alarms),
        *fence_endpoints(features.fences),
        *post_endpoints(features.posts),
    ]
