"""LoRP pruning as a REST service: FastAPI app, job store (Redis), artifact storage (S3)."""
