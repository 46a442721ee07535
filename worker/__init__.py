"""Celery workers: the upstream step of a job, its downstream grid as a chord, the aggregation."""
