"""Realtime websockets over the real listeners and a FakeBackend (the official clients are in
tests/contract): auth on the upgrade, msgpack frames, order, request_id echo, max_buffering, the
x-fal-error / x-fal-message control frames and the idle TIMEOUT."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.gateway.conftest import API_KEY, AUTH, FakeBackend, Live, live_gateway

SMALL = {"prompt": "a cat", "image_size": {"width": 64, "height": 48}, "num_inference_steps": 1}


def _ws_url(gw: Live, query: str = "", path: str = "/fal-ai/lcm/realtime") -> str:
    return gw.run.replace("https://", "wss://") + path + (f"?{query}" if query else "")


async def _results(ws: Any, n: int) -> list[Any]:
    """The next n frames that are not x-fal-message (binary frames decoded, text frames parsed)."""
    out: list[Any] = []
    while len(out) < n:
        frame = await asyncio.wait_for(ws.recv(), 20)
        decoded = msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)
        if isinstance(decoded, dict) and decoded.get("type") == "x-fal-message":
            assert decoded["action"] == "timings" and decoded["timing"] >= 0
            continue
        out.append(decoded)
    return out


async def _token(gw: Live, apps: list[str]) -> str:
    async with gw.client(gw.rest) as c:
        r = await c.post("/tokens/", json={"allowed_apps": apps, "token_expiration": 120})
    assert r.status_code == 201
    return str(r.json())


async def test_key_auth_order_and_request_id_echo(tmp_path: Path) -> None:
    async with (live_gateway(tmp_path / "var") as gw,
                websockets.connect(_ws_url(gw), ssl=gw.ssl, additional_headers=AUTH, max_size=None) as ws):
        for i in range(3):
            await ws.send(msgpack.packb({**SMALL, "seed": i, "request_id": f"r{i}", "sync_mode": False}))
        results = await _results(ws, 3)
    assert [r["request_id"] for r in results] == ["r0", "r1", "r2"]  # answered in order
    assert [r["seed"] for r in results] == [0, 1, 2]
    assert all(r["images"][0]["url"].startswith("data:image/jpeg;base64,") for r in results)  # inline, no files


async def test_jwt_auth_and_its_app_scope(tmp_path: Path) -> None:
    async with live_gateway(tmp_path / "var") as gw:
        token = await _token(gw, ["lcm"])
        async with websockets.connect(_ws_url(gw, f"fal_jwt_token={token}"), ssl=gw.ssl) as ws:
            await ws.send(msgpack.packb({**SMALL, "seed": 9}))
            (result,) = await _results(ws, 1)
            assert result["seed"] == 9
        other = await _token(gw, ["flux"])
        for query, status in ((f"fal_jwt_token={other}", 403), ("fal_jwt_token=forged.token.x", 401), ("", 401),
                              (f"fal_jwt_token={token}&max_buffering=61", 422)):
            with pytest.raises(InvalidStatus) as info:
                async with websockets.connect(_ws_url(gw, query), ssl=gw.ssl):
                    pass
            assert info.value.response.status_code == status, query
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(_ws_url(gw, path="/fal-ai/nope/realtime"), ssl=gw.ssl,
                                          additional_headers=AUTH):
                pass
        assert info.value.response.status_code == 404
        with pytest.raises(InvalidStatus):
            async with websockets.connect(_ws_url(gw), ssl=gw.ssl,
                                          additional_headers={"Authorization": f"Key {API_KEY}x"}):
                pass


async def test_max_buffering_drops_stale_frames(tmp_path: Path) -> None:
    async with (live_gateway(tmp_path / "var", FakeBackend(step_s=0.3)) as gw,
                websockets.connect(_ws_url(gw, "max_buffering=1"), ssl=gw.ssl, additional_headers=AUTH) as ws):
        for i in range(5):  # the first is taken at once; of the other four only the newest waits
            await ws.send(msgpack.packb({**SMALL, "request_id": f"r{i}"}))
            await asyncio.sleep(0.02)
        results = await _results(ws, 2)
        assert [r["request_id"] for r in results] == ["r0", "r4"]
        assert json.loads(await ws.recv())["type"] == "x-fal-message"  # r4's timings
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.8)


async def test_errors_are_control_frames_and_the_session_goes_on(tmp_path: Path) -> None:
    backend = FakeBackend()
    async with (live_gateway(tmp_path / "var", backend) as gw,
                websockets.connect(_ws_url(gw), ssl=gw.ssl, additional_headers=AUTH) as ws):
        await ws.send(msgpack.packb({**SMALL, "num_inference_steps": 99, "request_id": "bad"}))
        await ws.send(b"\xc1 not msgpack")
        await ws.send(msgpack.packb({**SMALL, "prompt": "fail internal"}))
        errors = await _results(ws, 3)
        backend.available = False
        await ws.send(msgpack.packb(SMALL))
        errors += await _results(ws, 1)
        backend.available = True
        await ws.send(json.dumps({**SMALL, "seed": 4}))  # JSON text frames are inputs too
        (ok,) = await _results(ws, 1)
    assert [e["type"] for e in errors] == ["x-fal-error"] * 4
    assert [e["error"] for e in errors] == ["VALIDATION_ERROR", "INVALID_INPUT", "INTERNAL_ERROR",
                                           "SERVICE_UNAVAILABLE"]
    assert errors[0]["request_id"] == "bad" and errors[0]["detail"][0]["loc"] == ["body", "num_inference_steps"]
    assert ok["seed"] == 4


async def test_idle_session_gets_falls_timeout_and_a_normal_close(tmp_path: Path) -> None:
    async with (live_gateway(tmp_path / "var", EMBER_REALTIME_IDLE_TIMEOUT="0.3") as gw,
                websockets.connect(_ws_url(gw), ssl=gw.ssl, additional_headers=AUTH) as ws):
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert frame == {"type": "x-fal-error", "error": "TIMEOUT", "reason": "no inputs, reconnect when needed!"}
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1000
