"""The project's held-out evals as inspect tasks, so one harness serves every stage and any served model."""
