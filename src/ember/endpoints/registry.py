"""The endpoints this server serves, by fal endpoint id."""

from __future__ import annotations

from ember.endpoints.base import Endpoint
from ember.endpoints.illusion_diffusion.translate import IllusionDiffusionEndpoint
from ember.endpoints.lcm.translate import LcmEndpoint
from ember.endpoints.lora.translate import LoraEndpoint
from ember.endpoints.pixart_sigma.translate import PixArtSigmaEndpoint
from ember.endpoints.sote_diffusion.translate import SoteDiffusionEndpoint

ENDPOINTS: dict[str, Endpoint] = {
    e.endpoint_id: e
    for e in (
        LcmEndpoint(), SoteDiffusionEndpoint(), LoraEndpoint(), PixArtSigmaEndpoint(),
        IllusionDiffusionEndpoint(),
    )
}


def find_endpoint(path: str) -> tuple[Endpoint, str] | None:
    """The endpoint a request path names, and the sub-path after it ("" or "/stream", ...).

    `path` has no leading slash: "fal-ai/lcm", "fal-ai/lcm/realtime".
    """
    for endpoint_id in sorted(ENDPOINTS, key=len, reverse=True):
        if path == endpoint_id or path.startswith(endpoint_id + "/"):
            return ENDPOINTS[endpoint_id], path[len(endpoint_id):]
    return None
