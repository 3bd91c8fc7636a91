"""A segmenter scored on a split of an ingested dataset, at each image's stored size, through the served decode path.

Why not the training stream's size: a user gets masks at the image's own size (the pyfunc
resizes the probabilities back), so the reported Dice / IoU are measured there, on what the
pyfunc returns (``MaskPredictor``), against the mask ingest stored with the image. Images
without a mask are counted and left out of the means. Rows are read with pyarrow (no Ray):
one pass, small enough for the splits a segmentation run validates on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.data.dataset import IngestedDataset
from pipelines.data.masks import decode_mask
from pipelines.serve.segment_pyfunc import MaskPredictor


@dataclass
class MaskReport:
    split: str
    dice: np.ndarray  # per image with a mask
    iou: np.ndarray
    without_mask: int  # images of the split with no mask (not scored)
    unusable: int  # images the predictor could not read (not scored)
    examples: list = field(default_factory=list)  # (image RGB uint8, true mask, predicted mask) for figures
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the dataset's row index of each scored image
    lesion_share: np.ndarray = field(default_factory=lambda: np.zeros(0))  # each scored image's true lesion share (trivial baselines)

    def scalars(self) -> dict[str, float]:
        return {"dice": float(self.dice.mean()) if len(self.dice) else float("nan"),
                "iou": float(self.iou.mean()) if len(self.iou) else float("nan"), "images": len(self.dice),
                "without_mask": self.without_mask, "unusable": self.unusable}

    def line(self) -> str:
        s = self.scalars()
        skipped = f"; {self.without_mask} without a mask, {self.unusable} unreadable, not scored" if self.without_mask or self.unusable else ""
        return f"{self.split}: Dice {s['dice']:.4f}  IoU {s['iou']:.4f} over {s['images']} images at their own size{skipped}"


def dice_iou_np(predicted: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (both empty: 1, as ``msmae.segmentation.dice_iou``)."""
    p, t = predicted.astype(bool), target.astype(bool)
    inter, total, union = int((p & t).sum()), int(p.sum() + t.sum()), int((p | t).sum())
    if union == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union


def evaluate_masks(predictor: MaskPredictor, dataset: IngestedDataset, split: str, batch_size: int = 32, examples: int = 0) -> MaskReport:
    """Dice / IoU per image of ``split`` (see the module docstring); ``examples``: keep that many for a figure."""
    from pipelines.data.transforms import decode

    dice, iou, without, unusable, kept, index, share = [], [], 0, 0, [], [], []
    rows = [r for r in dataset.rows(split)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        with_mask = [r for r in chunk if r.get("mask") is not None]
        without += len(chunk) - len(with_mask)
        if not with_mask:
            continue
        result = predictor.predict([r["image"] for r in with_mask])
        for r, predicted in zip(with_mask, result.masks):
            if predicted is None:
                unusable += 1
                continue
            truth = decode_mask(r["mask"], (predicted.shape[1], predicted.shape[0]))
            d, i = dice_iou_np(predicted, truth)
            dice.append(d)
            iou.append(i)
            index.append(int(r["index"]))
            share.append(float(truth.mean()))
            if len(kept) < examples:
                kept.append((np.asarray(decode(r["image"])), truth, predicted.astype(bool)))
    return MaskReport(split, np.asarray(dice), np.asarray(iou), without, unusable, kept, np.asarray(index, np.int64), np.asarray(share))


def contour_figure(examples: list, title: str):
    """Each example image with its true lesion contour (green) and the predicted one (magenta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(examples))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, truth, predicted) in zip(axes.flat, examples):
        ax.imshow(image)
        if truth.any():
            ax.contour(truth, levels=[0.5], colors=["lime"], linewidths=1.2)
        if predicted.any():
            ax.contour(predicted, levels=[0.5], colors=["magenta"], linewidths=1.2, linestyles="--")
        d, _ = dice_iou_np(predicted, truth)
        ax.set_title(f"Dice {d:.2f}", fontsize=9)
    fig.suptitle(f"{title}\ntrue contour: green, predicted: magenta (dashed)", fontsize=9)
    fig.tight_layout()
    return fig
