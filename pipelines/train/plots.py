"""Figures logged with a run: confusion matrix, ROC curves, training curves, attention overlays, reconstructions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

import msmae  # noqa: E402


def confusion_figure(confusion: list[list[int]], class_names: list[str], title: str = "") -> plt.Figure:
    """``title``: which split, how many images, which epoch (a figure without them cannot be read later)."""
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold (ties stepped together)."""
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(positive)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)]


def roc_figure(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str], aucs: list[float], title: str = "") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(class_names):
        positive = (labels == c).numpy()
        if positive.all() or not positive.any():
            continue
        fpr, tpr = roc_points(probs[:, c].numpy(), positive)
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[c]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def training_curves_figure(histories: dict[str, list[tuple[int, float]]], metric: str) -> plt.Figure:
    """Training loss and the validation ``metric`` per epoch, one column per stage that logged them.

    ``histories``: MLflow keys (``pretrain/train_loss``, ``finetune/val_macro_f1``) to ``(epoch, value)``."""
    stages = [s for s in ("pretrain", "finetune") if histories.get(f"{s}/train_loss") or histories.get(f"{s}/{metric}")]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4.8 * max(1, len(stages)), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        loss = sorted(histories.get(f"{stage}/train_loss", []))
        val = sorted(histories.get(f"{stage}/{metric}", []))
        if loss:
            ax.plot([e + 1 for e, _ in loss], [v for _, v in loss], color="tab:blue", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss", color="tab:blue")
        right = ax.twinx()
        if val:
            right.plot([e + 1 for e, _ in val], [v for _, v in val], color="tab:orange", marker="o", ms=3, label=metric)
        right.set_ylabel(f"{metric} (validation{', CLS head' if stage == 'pretrain' else ''})", color="tab:orange")
        ax.set_title(f"{stage}: {len(loss)} epochs", fontsize=9)
    fig.tight_layout()
    return fig


def to_rgb(images: torch.Tensor) -> np.ndarray:
    """Normalised ``[B, 3, H, W]`` back to displayable ``[B, H, W, 3]`` in [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def attention_figure(
    model: torch.nn.Module, images: torch.Tensor, true_names: list[str], predicted_names: list[str] | None = None,
    masks: torch.Tensor | None = None, source: str = "cls_attention",
) -> plt.Figure:
    """Each image with the model's map from ``source`` over it (what SAM would hide first), its true
    and predicted class, and the share of the map's mass on tissue (``msmae.map_quality``); with lesion
    ``masks`` (bool ``[B, H, W]`` at the images' size) the lesion's contour is drawn over the map and the
    mass is measured on the lesion instead (``msmae.lesion_metrics``)."""
    grid = msmae.encoder_of(model).patch_embed.grid_size
    patch = msmae.encoder_of(model).patch_embed.patch_size[0]
    weights = msmae.source_maps(model, images, source).cpu()  # grad_attention, occlusion: of the predicted class
    foreground = msmae.foreground_patches(images.cpu(), patch)
    overall = msmae.map_quality(weights, foreground)
    lesion = msmae.lesion_patches(masks.cpu(), patch) if masks is not None else None
    maps = weights.reshape(-1, *grid).numpy()
    rgb = to_rgb(images)
    fig, axes = plt.subplots(2, len(images), figsize=(2 * len(images) + 0.8, 4.6), squeeze=False)
    for k in range(len(images)):
        title = f"true {true_names[k]}" + (f"\npred {predicted_names[k]}" if predicted_names else "")
        axes[0, k].imshow(rgb[k])
        axes[0, k].set_title(title, fontsize=7)
        axes[1, k].imshow(rgb[k])
        shown = axes[1, k].imshow(maps[k], cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=(0, rgb.shape[2], rgb.shape[1], 0), interpolation="nearest")
        if lesion is not None:
            axes[0, k].contour(masks[k].cpu().float().numpy(), levels=[0.5], colors="white", linewidths=0.8)
            axes[1, k].contour(masks[k].cpu().float().numpy(), levels=[0.5], colors="white", linewidths=0.8)
            on = msmae.lesion_scores(weights[k:k + 1], lesion[k:k + 1])
            axes[1, k].set_title(f"on lesion {on.lesion_mass:.0%} of {on.lesion_share:.0%}" if on.images else "lesion: all or none", fontsize=7)
        else:
            mass = msmae.map_quality(weights[k:k + 1], foreground[k:k + 1])
            axes[1, k].set_title(f"on tissue {mass.foreground_mass:.0%} of {mass.foreground_share:.0%}", fontsize=7)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label="map weight")
    if lesion is not None:
        s = msmae.lesion_scores(weights, lesion)
        summary = (f"{source} maps, lesion contour in white; mass on lesion {s.lesion_mass:.0%} vs lesion's share of patches "
                   f"{s.lesion_share:.0%} (lift {s.lesion_lift:.2f}), pointing {s.pointing:.2f}, AUROC {s.auroc:.2f}")
    else:
        summary = (f"{source} maps; map mass on tissue {overall.foreground_mass:.0%} vs tissue's share of patches "
                   f"{overall.foreground_share:.0%} (lift {overall.foreground_lift:.2f}), entropy {overall.entropy:.2f}")
    fig.suptitle(summary, fontsize=8)
    return fig


@torch.no_grad()
def reconstruction_figure(
    model: msmae.MSMAEPretrainModel, images: torch.Tensor, mask_ratio: float, throw_ratio: float, uniform: bool = False,
) -> plt.Figure:
    """Rows: image; what the encoder sees (masked and thrown greyed); its reconstruction of the masked
    patches; each patch's role. The draw uses the model's attention maps (``uniform``: all ones)."""
    model.eval()
    preset = model.preset
    weights = torch.ones(len(images), preset.num_patches) if uniform else msmae.attention_maps(model, images)
    split = msmae.sam_masking(weights, mask_ratio, throw_ratio, torch.Generator().manual_seed(0))
    pred, _ = model(images, split)
    patches = msmae.patchify(images, preset.patch_size)
    visible = torch.zeros_like(patches)
    visible.scatter_(1, split.kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), patches.gather(1, split.kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1])))
    filled = visible.clone()
    filled.scatter_(1, split.masked.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), pred.float())
    roles = _role_image(split, preset)
    rows = [to_rgb(images), to_rgb(msmae.unpatchify(visible, preset.patch_size, preset.grid)), to_rgb(msmae.unpatchify(filled, preset.patch_size, preset.grid))]
    names = ["image", "visible to the encoder", "visible + reconstructed masked", "role of each patch"]
    fig, axes = plt.subplots(4, len(images), figsize=(2 * len(images), 8.4), squeeze=False)
    for r, row in enumerate(rows):
        for k in range(len(images)):
            axes[r, k].imshow(row[k])
    colours = ListedColormap(["#2ca02c", "#d62728", "#7f7f7f"])  # visible, masked, thrown
    for k in range(len(images)):
        axes[3, k].imshow(roles[k], cmap=colours, vmin=0, vmax=2, interpolation="nearest")
    for r in range(4):
        axes[r, 0].set_title(names[r], fontsize=8, loc="left")
        for ax in axes[r]:
            ax.axis("off")
    legend = [Patch(color=c, label=n) for c, n in zip(colours.colors, (
        f"visible ({split.kept.shape[1]})", f"masked, reconstructed ({split.masked.shape[1]})", f"thrown ({split.thrown.shape[1]})"))]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _role_image(split: msmae.MaskSplit, preset: msmae.ViTPreset) -> np.ndarray:
    """``[B, gh, gw]`` with 0 = visible, 1 = masked, 2 = thrown."""
    roles = torch.zeros(split.kept.shape[0], preset.num_patches, dtype=torch.long)
    roles.scatter_(1, split.masked.cpu(), 1)
    roles.scatter_(1, split.thrown.cpu(), 2)
    return roles.reshape(-1, *preset.grid).numpy()


def reliability_figure(curves: dict[str, object], title: str = "") -> plt.Figure:
    """Reliability diagram: accuracy against confidence per bin for each named ``calibration.Reliability``
    (e.g. before and after temperature scaling), the diagonal a calibrated model would sit on, and
    how many images each bin holds (ECE weighs bins by it)."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.2, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    for k, (name, r) in enumerate(curves.items()):
        centres = (r.edges[:-1] + r.edges[1:]) / 2
        filled = r.counts > 0
        ax.plot(r.confidence[filled], r.accuracy[filled], "o-", ms=4, label=f"{name} (ECE {r.ece:.3f})")
        width = (r.edges[1] - r.edges[0]) / (len(curves) + 0.5)
        hist.bar(centres - (r.edges[1] - r.edges[0]) / 2 + width * (k + 0.75), r.counts, width=width, label=name)
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "reliability (top label, 15 bins)", fontsize=9)
    hist.set_xlabel("confidence (top probability)")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig
