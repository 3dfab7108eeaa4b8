"""Prompt simulation for training: which instances of an image are prompted, and how."""

from __future__ import annotations

import torch


def sample_box_prompts(
    boxes: torch.Tensor,
    input_size: tuple[int, int],
    noise_std: float = 0.1,
    max_noise: float = 20.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boxes jittered as in the SAM recipe: each coordinate moves by N(0, (std * side)^2), at most
    `max_noise` px, then clipped to the image (`input_size` = (h, w) before padding).
    """
    if noise_std <= 0 or boxes.numel() == 0:
        return boxes.clone()
    w = (boxes[:, 2] - boxes[:, 0]).unsqueeze(1)
    h = (boxes[:, 3] - boxes[:, 1]).unsqueeze(1)
    side = torch.cat([w, h, w, h], dim=1)
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device if generator is None else "cpu")
    noise = noise.to(boxes.device) * noise_std * side
    noise = noise.clamp(-max_noise, max_noise)
    out = boxes + noise
    out[:, 0::2] = out[:, 0::2].clamp(0, input_size[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, input_size[0])
    # keep x0 < x1 and y0 < y1 after the jitter
    x0 = torch.minimum(out[:, 0], out[:, 2])
    x1 = torch.maximum(out[:, 0], out[:, 2])
    y0 = torch.minimum(out[:, 1], out[:, 3])
    y1 = torch.maximum(out[:, 1], out[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=1)


def select_instances(
    num_instances: int, max_instances: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of at most `max_instances` instances, a random subset when there are more."""
    if num_instances <= max_instances:
        return torch.arange(num_instances)
    return torch.randperm(num_instances, generator=generator)[:max_instances].sort().values
