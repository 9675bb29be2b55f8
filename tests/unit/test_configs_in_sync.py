"""`make check`'s configs-in-sync check, also run by `make test`: every Triton config.pbtxt agrees with
the pipeline's tensor contract and with what the gateway's translate code sends."""

from __future__ import annotations

from pathlib import Path

from ember.specs.check import problems

REPO = Path(__file__).resolve().parents[2]


def test_model_configs_match_the_code() -> None:
    assert problems(REPO / "model_repository") == []
