"""The one-process comparison harness: MSMAE vs MAE vs a supervised ViT on one device.

Not the method (that is ``msmae``, which never imports this package): a harness that
trains and tests each compared method end to end on a dataset held on the device, for
``benchmarks/compare.py`` and its tests. Needs torch and timm only (torchvision comes with
timm), so it runs on a GPU box without Ray or MLflow.

Modules:
    comparison.runner    the methods, the shared recipe, both stages through msmae.StageTrainer
    comparison.pretrain_store  pre-trainings kept on disk: reused, resumed, snapshotted part-way
    comparison.budget    step-time calibration and fitting the epochs to a time budget
    comparison.bundle    a dataset in one file (JPEG bytes, labels, splits), decoded on the device
    comparison.augment   RandomResizedCrop + flip batched on the device, with each crop's box
"""
