"""The top layer: pipelines (``hrsa run``: pipeline.py validates, runner.py runs the stages, state.py and
stage_keys.py decide what is up to date, progress.py draws), Ray job submission (``hrsa submit``), the demo,
and the cluster and KubeRay manifests. The Ray connection itself lives below, in :mod:`hrsa.runtime.connection`."""
