"""Redis keys of the test-only hold point (see ``tests.integration.hold_worker``); importable
without building the worker's settings."""

HOLD_KEY = "lorp:test:hold"
HELD_PREFIX = "lorp:test:held:"

# Progress reports at which a job is parked before it is cancelled, one per stage the worker
# reports. "downloading#2" is after the inputs are on the worker's disk; "uploading#3" after two
# artifacts are already in the bucket.
CANCEL_POINTS = (
    "downloading#2",
    "loading",
    "calibration",
    "selection",
    "evaluation",
    "benchmark",
    "pruning",
    "saving",
    "report",
    "uploading#3",
)

# A one-workload benchmark: with an evaluation text, every pipeline stage exists.
SMALL_BENCH = {
    "prefill": [[1, 16]],
    "decode": [],
    "warmup": 0,
    "repetitions": 10,
    "measure_blocks": False,
}
