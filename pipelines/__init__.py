"""The distributed side of msmae-ray, in three rooms and a few shared modules.

    data/    from a user's folder or manifest to Ray Data streams: sources, ingest, splits,
             the ingested dataset (``IngestedDataset``), transforms, streams, preprocessing
    train/   Ray Train stages (pre-training, fine-tuning), the two-stage runner, ``msmae run``,
             finishing a run (evaluate, calibrate, figures, register)
    serve/   a trained model in use: loading, evaluate, predict (Ray Data batch inference),
             the registered pyfunc, the registry, explanations, calibration, the model card

Shared by all three: ``config`` (the typed run configuration), ``tracking`` (MLflow logging),
``checkpoint`` (the one weights format), ``local_ray`` (local Ray start-up), ``outputs``
(output paths checked, files written atomically). Imports point one way — train → serve →
data → shared → ``msmae`` — and never in a circle (``tests/pipelines/test_layout.py``).
Modules import Ray lazily where they can, so ``msmae --help`` stays fast.
"""
