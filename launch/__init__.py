"""Entry points: the ``orchestrate`` CLI, launchers and the per-rank worker."""
