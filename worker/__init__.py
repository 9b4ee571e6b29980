"""Celery worker: one thin task ``run_job(job_id)`` that runs the LoRP pipeline for a job."""
