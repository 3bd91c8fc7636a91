"""The attention table: one row of patch weights per training image, keyed by dataset index.

Stored by the stable ``index`` column of the ingested dataset (not by position in a
worker's shard), so every worker and node can hold the same table and a restored
checkpoint brings back exactly the maps it trained with (reference-code defect 5).
"""

from __future__ import annotations

import torch

from msmae.geometry import crop_flip_maps


class AttentionTable:
    """``[num_images, L]`` weights in [0, 1]; uniform (all ones) until the first refresh."""

    def __init__(
        self, num_images: int, grid: tuple[int, int], dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"
    ) -> None:
        self.grid = grid
        # On a GPU worker keep the table on the GPU: looking rows up by a device index then
        # needs no copy to the host (which would stall the GPU every step).
        self.maps = torch.ones(num_images, grid[0] * grid[1], dtype=dtype, device=device)
        self.refreshed_at: int | None = None  # epoch of the last refresh, None = never

    def __len__(self) -> int:
        return self.maps.shape[0]

    def update(self, index: torch.Tensor, maps: torch.Tensor, epoch: int | None = None) -> None:
        """Write refreshed maps ``[N, L]`` for dataset indices ``[N]``."""
        index = index.long().to(self.maps.device)
        if index.numel() and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"dataset index out of range [0, {len(self)}): min {int(index.min())}, max {int(index.max())}")
        if maps.shape != (index.numel(), self.maps.shape[1]):
            raise ValueError(f"maps must be [{index.numel()}, {self.maps.shape[1]}], got {tuple(maps.shape)}")
        self.maps[index] = maps.detach().to(self.maps.device, self.maps.dtype)
        if epoch is not None:
            self.refreshed_at = epoch

    def batch_weights(
        self,
        index: torch.Tensor,
        crop_boxes: torch.Tensor,
        flipped: torch.Tensor,
        out_grid: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Weights ``[B, L_out]`` for an augmented batch: rows looked up, then cropped and flipped."""
        rows = self.rows(index, device or crop_boxes.device)
        return crop_flip_maps(rows, self.grid, crop_boxes, flipped, out_grid)

    def rows(self, index: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The stored maps ``[B, L]`` of dataset indices ``[B]`` as float32, unmoved by any augmentation."""
        return self.maps[index.long().to(self.maps.device)].to(device or self.maps.device, torch.float32)

    def state_dict(self) -> dict:
        return {"grid": list(self.grid), "maps": self.maps.cpu().clone(), "refreshed_at": self.refreshed_at}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> "AttentionTable":
        table = cls(state["maps"].shape[0], tuple(state["grid"]), state["maps"].dtype, device)
        table.maps.copy_(state["maps"])
        table.refreshed_at = state["refreshed_at"]
        return table
