"""The job core: what the REST API (``service``) and the worker (``worker``) share about a job.

- :mod:`jobcore.config`: the ``LORP_*`` settings both processes read;
- :mod:`jobcore.errors`: the job store's, queue's and object store's errors and the job error
  codes besides the library's;
- :mod:`jobcore.spec`: the job spec ``JobCreate`` (the job's options, declared once), its
  checks, ``JobState`` and what a job record says of its outcome;
- :mod:`jobcore.store`: the job store in Redis (records, indexes, transitions, run lock);
- :mod:`jobcore.storage`: the object store (inputs and artifacts, S3 API);
- :mod:`jobcore.queue`: the Celery app settings and the ``run_job`` message.

Neither ``service`` nor ``worker`` imports the other; both import this package, which imports
neither. Nothing here loads torch, numpy or transformers: from the library it reads only the
method registry (:mod:`lorp.methods`), :mod:`lorp.paths` and :mod:`lorp.errors`
(``tests/unit/test_import_boundaries.py`` checks it).
"""
