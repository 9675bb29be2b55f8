"""Which requests can share one network batch."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from ember.pipeline.requests import Text2ImageRequest


def batch_key(request: Text2ImageRequest) -> Hashable:
    """Requests with equal keys denoise in lock-step with equal tensor shapes.

    Guidance scale is not part of the key: LCM takes it per sample (timestep_cond), so requests with
    different guidance batch together and still get exactly their own result.
    """
    return (request.width, request.height, request.num_inference_steps)


def group_compatible(
    requests: Sequence[Text2ImageRequest],
    max_images: int,
    key: Callable[[Text2ImageRequest], Hashable] = batch_key,
) -> list[list[int]]:
    """Indices of `requests` grouped by `key` (an endpoint may add its own fields to batch_key), in arrival
    order, at most `max_images` images a group."""
    groups: list[list[int]] = []
    open_group: dict[Hashable, int] = {}  # key -> position in `groups` of the group still filling
    images: list[int] = []
    for index, request in enumerate(requests):
        group = key(request)
        slot = open_group.get(group)
        if slot is None or images[slot] + request.num_images > max_images:
            open_group[group] = slot = len(groups)
            groups.append([])
            images.append(0)
        groups[slot].append(index)
        images[slot] += request.num_images
    return groups
