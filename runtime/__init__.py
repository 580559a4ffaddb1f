"""What every job shares, below extract/, analyze/, train/ and cluster/ (above store/, whose errors it raises).

- :mod:`hrsa.runtime.connection`: the one Ray connection (extraction, training and Dask-on-Ray analysis).
- :mod:`hrsa.runtime.settings`: a verb's settings from YAML + flags, validated by pydantic; the one formatter
  of validation problems.
- :mod:`hrsa.runtime.files`: the one atomic file writer (a reader never sees half a file), and ``$HRSA_CACHE``.
- :mod:`hrsa.runtime.fingerprint`: content digests of files and folders (weights read once per machine).
- :mod:`hrsa.runtime.folder_lock`: one writer at a time per folder (a training run, a pipeline's out): flock, or
  a renewed lease on S3.
- :mod:`hrsa.runtime.locations`: a folder on a local disk or behind a URL (``s3://...``), read and written through
  the pyarrow filesystem Ray Train uses (a training run's output, a pipeline's out, a remote checkpoint).
- :mod:`hrsa.runtime.placement`: how many CPUs each worker takes so that every worker fits one node.
- :mod:`hrsa.runtime.cli_options`: a verb's click flags generated from its pydantic config model.
"""
