"""The process around a run:

    preempt.py   SIGTERM/SIGUSR1: checkpoint and exit 75
    watchdog.py  --stall-timeout: abort a rank that sees no progress
    faults.py    the tests' fault injection (HPCFL_TESTING=1 only), in one place
"""
