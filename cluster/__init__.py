"""The orchestrator: the ``polyrec`` command, the end-to-end pipeline, retraining, job submission."""
