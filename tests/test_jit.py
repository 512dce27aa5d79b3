"""megatron_ki/jit.py: the build switch and the signal guard around JIT builds (a process killed inside a
torch JIT build leaves its lock file behind, and every later build on the machine waits for it forever)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from tests.bad_inputs.harness import ROOT


def test_sigterm_inside_the_guard_is_delivered_after_it():
    code = textwrap.dedent(
        """
        import os, signal, sys
        from megatron_ki.jit import signals_deferred
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            print("the block finished", flush=True)
        print("never printed", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout.splitlines() == ["the block finished"]


def test_guard_restores_the_handlers():
    from megatron_ki.jit import signals_deferred

    before = signal.getsignal(signal.SIGTERM)
    with signals_deferred():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
