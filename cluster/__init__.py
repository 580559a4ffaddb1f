"""Ray connection, job submission, cluster and KubeRay manifests, and the pipeline runner."""
