"""The one interface every engine runtime implements."""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch


class RefitNotSupportedError(NotImplementedError):
    """This runtime cannot swap weights in place yet (needed for LoRA; a later issue)."""


class Runner(abc.ABC):
    """One network, ready to run: named tensors in, named tensors out.

    Inputs may be on any device and of any float dtype; a runner moves and casts them as its engine needs.
    Outputs come back as float32 (or the spec's integer dtype) on `self.device`.
    """

    name: str
    device: torch.device

    @abc.abstractmethod
    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Replace weights in place, keyed by the source component's state-dict names (LoRA fusing)."""
        raise RefitNotSupportedError(
            f"the {type(self).__name__} runtime cannot refit {self.name!r} yet: weight refit (LoRA) is not "
            "implemented for it; use EMBER_RUNTIME=torch for models that need it"
        )

    def weights(self) -> Mapping[str, torch.Tensor]:
        """The current weights by state-dict name (read them, never write): the base a LoRA merges onto."""
        raise RefitNotSupportedError(
            f"the {type(self).__name__} runtime cannot expose {self.name!r}'s weights for LoRA merging yet; "
            "use EMBER_RUNTIME=torch for models that need it"
        )
