"""Prefect flows: orchestration only; each task runs one DVC stage."""
