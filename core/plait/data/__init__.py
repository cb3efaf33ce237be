"""The data pipeline: load each ``datasets:`` entry, tokenize it through the
``tokenize`` hook, filter and count rows, split off an eval set, and cache the
result on disk.

Modules, one job each:

``sources``       read one dataset entry (local files, a saved directory, the hub)
``prepare``       :func:`prepare_datasets`, the whole pipeline for one run
``cache``         cache keys (hash of data, tokenizer and settings) and atomic writes
``streaming``     read ``pretraining_dataset`` lazily, up to the run's token budget
``rows``          the columns of a prepared row and per-entry statistics
``inspect_rows``  show a tokenized row with trained and masked tokens apart
``packing``       bin-pack tokenized rows into ``sequence_len`` (sample_packing)
``batching``      plan the micro-batches of an epoch

Import from the submodules; this package imports nothing heavy.
"""
