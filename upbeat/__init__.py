"""upbeat: RLHF on tweets, reproducible with DVC, scheduled with Prefect, tracked in MLflow."""
