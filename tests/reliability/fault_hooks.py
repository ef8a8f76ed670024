"""Faults injected into Ray workers by tests, through Ray's `worker_process_setup_hook` (test code only).

`kill_once_on_publish` makes the first worker that is about to publish a file whose name ends with
`$HICOM_FAULT_SUFFIX` (a part's tar, or its marker) SIGKILL itself: the data before it is on disk, the file
itself is not, exactly as if the node died mid-commit. `$HICOM_FAULT_FLAG` records that it happened, once.
"""
import os
import signal
from pathlib import Path


def kill_once_on_publish() -> None:
    flag, suffix = Path(os.environ["HICOM_FAULT_FLAG"]), os.environ["HICOM_FAULT_SUFFIX"]
    real_replace = os.replace

    def replace(src, dst):
        name = Path(dst).name
        if name.startswith("part-") and name.endswith(suffix):
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real_replace(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
