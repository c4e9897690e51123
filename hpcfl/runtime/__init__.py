"""The process around a run:

    preempt.py   SIGTERM/SIGUSR1: checkpoint and exit 75
    watchdog.py  --stall-timeout: abort a rank that sees no progress
    testing.py   the tests' seams (fault injection with HPCFL_TESTING=1, secure aggregation's
                 taps), in one place: production code calls Hooks that do nothing
"""
