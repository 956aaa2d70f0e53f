"""A call that gives up after `seconds` (rewards.timeout_s bounds each reward-function call).

In the main thread (the CLI, a notebook kernel) a SIGALRM timer raises inside the function itself: the function
stops, its memory is freed and the process stays usable. Python cannot stop a thread, so a worker-thread timeout
would leave the hung function running (a notebook kernel would keep a spinning thread forever); the thread is only
the fallback off the main thread, or when someone else's ITIMER_REAL is running (we must not replace it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class CallTimeout(Exception):
    """The call did not return within its time limit."""


class _Expired(BaseException):
    """Raised by the timer inside the call: a BaseException, so the function's own `except Exception` cannot
    swallow it."""


def call_with_timeout(fn: Callable, seconds: float | None, *args: Any, **kwargs: Any) -> Any:
    if not seconds:
        return fn(*args, **kwargs)
    alarm_free = hasattr(signal, "setitimer") and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    if threading.current_thread() is threading.main_thread() and alarm_free:
        return _with_alarm(fn, seconds, args, kwargs)
    return _in_thread(fn, seconds, args, kwargs)


def _with_alarm(fn: Callable, seconds: float, args: tuple, kwargs: dict) -> Any:
    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Expired:
        raise CallTimeout(f"no answer within {seconds:g} s") from None
    finally:
        signal.signal(signal.SIGALRM, previous)


def _in_thread(fn: Callable, seconds: float, args: tuple, kwargs: dict) -> Any:
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    worker = threading.Thread(target=run, name="reward-function", daemon=True)  # daemon: it cannot block exit
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise CallTimeout(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
