"""The overlay figure draws each image's lesion contour over its map and scores the map on the lesion."""

from __future__ import annotations

import torch

import msmae
from pipelines.train import plots


def test_overlay_draws_lesion_contours_and_scores_on_the_lesion():
    torch.manual_seed(0)
    model = msmae.build_classifier(msmae.get_preset("tiny", img_size=32, patch_size=8), 2, drop_path_rate=0.0).eval()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    fig = plots.attention_figure(model, images, ["a", "b"], ["a", "a"], masks=masks, source="rollout")
    assert "rollout maps, lesion contour" in fig._suptitle.get_text() and "pointing" in fig._suptitle.get_text()
    panels = fig.axes[:4]  # 2 rows (image, map) x 2 images; the colour bar comes after
    assert sum("on lesion" in ax.get_title() for ax in panels) == 2
    assert all(ax.collections for ax in panels)  # a lesion contour on every panel
    plain = plots.attention_figure(model, images, ["a", "b"])  # no masks: the tissue measure, no contours
    assert "mass on tissue" in plain._suptitle.get_text() and not any(ax.collections for ax in plain.axes[:4])
