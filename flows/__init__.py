"""Prefect flows: orchestration only. They run DVC stages as subprocesses and import no ML code."""
