"""Fault injection for the embed stage (importable by the CLI subprocesses of the tests)."""

import os
import signal


def kill_before_commit(*, run_id, staged):
    """``embed.before_commit_hook``: die hard after the actors wrote their files, before the commit."""
    assert staged, "the hook must run after files were staged"
    os.kill(os.getpid(), signal.SIGKILL)
