"""The physicists' review page (DESIGN.md §8): a FastAPI application over the audit database."""
