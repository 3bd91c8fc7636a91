"""Data: what a user has (an ImageFolder tree, a manifest) → an ingested dataset → Ray Data streams.

    sources            a kind of input and its listing (one class per kind: ``SOURCE_KINDS``)
    images             decode and validate one image; the quarantine reasons
    ingest             ``msmae ingest``: the flow from a listing to a published dataset
    ingest_options     its options, checked before anything is read, and its errors
    destination        the output folder: refused when it would be damaged, staged, swapped in
    shards             the Parquet shard schema and writer
    splits             split groups (copies held together) and the group-aware split
    dataset            ``IngestedDataset``: ``dataset.json`` read once, passed everywhere after
    transforms         training and evaluation transforms (PIL + numpy, in Ray Data tasks)
    streams            the Ray Data streams the stages and evaluation read
    preprocessing      a model's decode-and-resize recipe, carried with the model
    folder_datasource  a Ray Data datasource that lists a folder tree (``msmae predict``)

Nothing here imports ``train`` or ``serve``.
"""
