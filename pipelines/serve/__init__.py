"""Serving: a trained model in use — loaded, evaluated, run over folders, registered, explained.

    loading      a classifier from a model URI or a checkpoint folder, with its temperature and preprocessing
    evaluate     full-image evaluation of a split, and the printed metrics table
    predict      ``msmae predict``: Ray Data batch inference over a folder tree into Parquet shards
    actor_pool   scoring actor pools sized to the cluster (shared by predict and large evaluations)
    pyfunc       the registered MLflow pyfunc (images in, calibrated probabilities out)
    registry     logging the pyfunc, its model card and alias; default model names (one per dataset)
    promotion    which alias a new version gets: quality gate, same classes and data, champion scored on the same split
    explain      patch-occlusion maps of a prediction
    calibration  temperature scaling (kept only when it lowers validation ECE) and expected calibration error
    model_card   the model card in markdown

Uses ``data`` and the shared modules; never imports ``train``.
"""
