"""Ray Data pipelines: media ingest, the Parquet feature store, and dialogue synthesis.

One data root (local path or ``s3://bucket/prefix``) holds everything; the two jobs fill it::

    python jobs/synthesize.py out=ROOT                                 # offline generator
    python jobs/features.py source=ROOT/manifest.parquet out=ROOT

    ROOT/media/{image,audio}/...    generated files (synthesize)
    ROOT/manifest.parquet           uri, modality, caption, transcript, lang (+ media_id, kind,
                                    index, split, facts) - ingest's input (synthesize)
    ROOT/dialogues/part-*.parquet   DIALOGUES (synthesize)
    ROOT/media.parquet              MEDIA: one row per item and caption language (features)
    ROOT/errors.parquet             ERRORS: uri, stage, reason (features)
    ROOT/features/part-*.parquet    FEATURES, keyed by (media_id, encoder) (features)

Imported dialogues (``jobs/import_dialogues.py``, :mod:`.imports`) land in the same layout:
``ROOT/dialogues/part-import-NAME.parquet``, ``ROOT/import_errors/NAME.parquet`` and
``ROOT/import_manifest.parquet`` (the features job's input).

What training reads: ``ROOT/dialogues`` (filter ``split``), features by ``media_id`` through
:class:`pipelines.store.FeatureStore` (``load(ids, encoder)`` -> float32 arrays, in the order
of each dialogue's ``media_ids``), and stage 1's pairs from ``ROOT/media.parquet`` through
:func:`pipelines.captions.caption_pairs`.

Modules: :mod:`.storage` (filesystems, atomic writes), :mod:`.runtime` (Ray start-up, pools,
column checks), :mod:`.ingest`, :mod:`.features`, :mod:`.store`, :mod:`.synth`, :mod:`.imports`, :mod:`.cli`.
"""
