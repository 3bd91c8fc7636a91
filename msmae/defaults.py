"""The paper's hyper-parameters, declared once.

Every other place that needs one of these — the step functions' keyword defaults, the
typed run configuration, the comparison runner's recipe — reads it from here, so changing
a default means changing one line. Values are the reference code's (see docs/method.md).
"""

from __future__ import annotations

MASK_RATIO = 0.45  # m: share of patches hidden and reconstructed
THROW_RATIO = 0.30  # t: share hidden and left out of decoder and loss
RANDOM_MASK_RATIO = 0.75  # MAE's random masking before SAM starts
CLS_WEIGHT = 0.1  # lambda: weight of the CLS cross-entropy in pre-training
NORM_PIX_LOSS = False

PRETRAIN_BLR = 1e-3  # lr = blr * batch / 256
PRETRAIN_BETAS = (0.9, 0.95)
FINETUNE_BLR = 1e-3
FINETUNE_MIN_LR = 1e-6
WEIGHT_DECAY = 0.05
LAYER_DECAY = 0.75
LABEL_SMOOTHING = 0.1
DROP_PATH = 0.1
