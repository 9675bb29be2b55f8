"""Bad input gets fal's 422 `detail` shape (loc / msg / type), never a 500, and queues nothing;
unknown endpoints 404; bodies over EMBER_MAX_BODY_BYTES 413. Run and queue share one code path,
so every case is checked on both hosts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from ember.gateway.app import GatewayApps
from ember.gateway.state import GatewayState
from tests.gateway.conftest import QUEUE_BASE, RUN_BASE, client

# How pydantic names the preset member of the `image_size` union in a loc (FastAPI reports the same).
PRESETS_LITERAL = "literal['square_hd','square','portrait_4_3','portrait_16_9','landscape_4_3','landscape_16_9']"

# (input, expected loc, expected type): the first detail entry whose loc matches must have that type.
BAD_LCM_INPUTS: list[tuple[str, Any, list[Any], str]] = [
    ("missing prompt", {}, ["body", "prompt"], "missing"),
    ("prompt not a string", {"prompt": 5}, ["body", "prompt"], "string_type"),
    ("steps below range", {"prompt": "x", "num_inference_steps": 0}, ["body", "num_inference_steps"],
     "greater_than_equal"),
    ("steps above range", {"prompt": "x", "num_inference_steps": 13}, ["body", "num_inference_steps"],
     "less_than_equal"),
    ("steps not a number", {"prompt": "x", "num_inference_steps": "four"}, ["body", "num_inference_steps"],
     "int_parsing"),
    ("guidance above range", {"prompt": "x", "guidance_scale": 8.5}, ["body", "guidance_scale"],
     "less_than_equal"),
    ("strength below range", {"prompt": "x", "strength": -0.1}, ["body", "strength"], "greater_than_equal"),
    ("too many images", {"prompt": "x", "num_images": 9}, ["body", "num_images"], "less_than_equal"),
    ("negative seed", {"prompt": "x", "seed": -1}, ["body", "seed"], "greater_than_equal"),
    ("seed beyond int64", {"prompt": "x", "seed": 2**63}, ["body", "seed"], "less_than_equal"),
    ("sync_mode not a bool", {"prompt": "x", "sync_mode": "maybe"}, ["body", "sync_mode"], "bool_parsing"),
    ("unknown model", {"prompt": "x", "model": "sd3"}, ["body", "model"], "literal_error"),
    ("bad image_size preset", {"prompt": "x", "image_size": "huge"},
     ["body", "image_size", PRESETS_LITERAL], "literal_error"),
    ("zero width", {"prompt": "x", "image_size": {"width": 0, "height": 512}},
     ["body", "image_size", "ImageSize", "width"], "greater_than"),
    ("width not a multiple of 8", {"prompt": "x", "image_size": {"width": 500, "height": 512}},
     ["body", "image_size", "width"], "value_error"),
    ("height not a multiple of 8", {"prompt": "x", "image_size": {"width": 512, "height": 513}},
     ["body", "image_size", "height"], "value_error"),
    ("size beyond what we render", {"prompt": "x", "image_size": {"width": 4096, "height": 4096}},
     ["body", "image_size"], "value_error"),
    ("mask without an image", {"prompt": "x", "mask_url": "https://example.com/m.png"},
     ["body", "mask_url"], "value_error"),
    ("lora_url not a URL", {"prompt": "x", "lora_url": "ftp://example.com/l.safetensors"},
     ["body", "lora_url"], "url_not_allowed"),
    ("controlnet_inpaint with sdxl (an SD1.5 ControlNet)",
     {"prompt": "x", "model": "sdxl", "image_url": "https://example.com/a.png",
      "mask_url": "https://example.com/m.png", "controlnet_inpaint": True},
     ["body", "controlnet_inpaint"], "not_supported"),
    ("body not an object", ["a cat"], ["body"], "model_type"),
]

BAD_BODIES: list[tuple[str, bytes, list[Any], str]] = [
    ("malformed JSON", b'{"prompt": "a cat",', ["body", 19], "json_invalid"),
    ("empty body", b"", ["body"], "missing"),
    ("NaN is not JSON", b'{"prompt": "x", "strength": NaN}', ["body"], "json_invalid"),
    ("not UTF-8", b'{"prompt": "\xff\xfe"}', ["body"], "json_invalid"),
]


def _hosts(apps: GatewayApps) -> list[tuple[object, str]]:
    return [(apps.run, RUN_BASE), (apps.queue, QUEUE_BASE)]


def _check_422(r: httpx.Response, loc: list[Any], type_: str) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert isinstance(body["detail"], list) and body["detail"]
    for entry in body["detail"]:
        assert set(entry) == {"loc", "msg", "type"}
        assert entry["loc"][0] == "body"
        assert isinstance(entry["msg"], str) and entry["msg"]
    matching = [e for e in body["detail"] if e["loc"] == loc]
    assert matching, f"no detail at {loc}: {body['detail']}"
    assert matching[0]["type"] == type_
    assert isinstance(body["message"], str) and body["message"]
    assert r.headers["x-fal-request-id"]
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize(("case", "payload", "loc", "type_"), BAD_LCM_INPUTS, ids=[c[0] for c in BAD_LCM_INPUTS])
async def test_bad_lcm_input_is_422(
    state: GatewayState, apps: GatewayApps, case: str, payload: Any, loc: list[Any], type_: str
) -> None:
    for app, base in _hosts(apps):
        async with client(app, base) as c:
            _check_422(await c.post("/fal-ai/lcm", json=payload), loc, type_)
    assert state.jobs.active == {}


@pytest.mark.parametrize(("case", "body", "loc", "type_"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_body_is_422(
    state: GatewayState, apps: GatewayApps, case: str, body: bytes, loc: list[Any], type_: str
) -> None:
    for app, base in _hosts(apps):
        async with client(app, base) as c:
            r = await c.post("/fal-ai/lcm", content=body, headers={"content-type": "application/json"})
            _check_422(r, loc, type_)
    assert state.jobs.active == {}


async def test_valid_input_with_presets_and_custom_size_is_accepted(queue_client: httpx.AsyncClient) -> None:
    for size in ("square", "landscape_16_9", {"width": 768, "height": 512}, None):
        r = await queue_client.post("/fal-ai/lcm", json={"prompt": "a cat", "image_size": size, "seed": 7})
        assert r.status_code == 200, r.text


async def test_unknown_fields_are_ignored_like_fal(queue_client: httpx.AsyncClient) -> None:
    r = await queue_client.post("/fal-ai/lcm", json={"prompt": "a cat", "not_a_field": 1})
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/fal-ai/flux/dev", "/fal-ai/lcmx", "/someone/else", "/workflows/me/flow",
                                  "/comfy/me/graph/sub"])
async def test_unknown_endpoint_is_404(apps: GatewayApps, path: str) -> None:
    for app, base in _hosts(apps):
        async with client(app, base) as c:
            r = await c.post(path, json={"prompt": "a cat"})
        assert r.status_code == 404
        assert r.json()["error_type"] == "not_found"
        assert r.headers["x-fal-request-id"]


async def test_unserved_sub_path_is_404(run_client: httpx.AsyncClient) -> None:
    r = await run_client.post("/fal-ai/lcm/no-such-path", json={"prompt": "a cat"})
    assert r.status_code == 404
    assert "fal-ai/lcm" in r.json()["detail"]


@pytest.mark.parametrize("declared", [True, False])
async def test_body_over_limit_is_413(state: GatewayState, apps: GatewayApps, declared: bool) -> None:
    big = b'{"prompt": "' + b"x" * (state.settings.max_body_bytes + 1) + b'"}'

    async def chunks():  # a streamed body with no Content-Length
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    for app, base in _hosts(apps):
        async with client(app, base) as c:
            r = await c.post("/fal-ai/lcm", content=big if declared else chunks(),
                             headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error_type"] == "payload_too_large"
        assert r.headers["x-fal-request-id"]
    assert state.jobs.active == {}


@pytest.mark.parametrize(("header", "value"), [
    ("x-fal-queue-priority", "urgent"),
    ("x-fal-request-timeout", "soon"),
    ("x-fal-request-timeout", "-3"),
])
async def test_bad_queue_headers_are_422(queue_client: httpx.AsyncClient, header: str, value: str) -> None:
    r = await queue_client.post("/fal-ai/lcm", json={"prompt": "a cat"}, headers={header: value})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["header", header]


async def test_bad_webhook_is_422(queue_client: httpx.AsyncClient) -> None:
    r = await queue_client.post("/fal-ai/lcm?fal_webhook=ftp%3A%2F%2Fx", json={"prompt": "a cat"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "fal_webhook"]


async def test_wrong_method_is_405_json(run_client: httpx.AsyncClient) -> None:
    r = await run_client.get("/fal-ai/lcm")
    assert r.status_code == 405
    assert r.json()["error_type"] == "method_not_allowed"
    assert r.headers["x-fal-request-id"]
