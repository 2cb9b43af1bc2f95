"""kvm_vmm.clock.TimerThread: the real-time Clock/Timer every device shares."""

from __future__ import annotations

import threading
import time

from kvm_vmm.clock import TimerThread


def test_callbacks_run_in_deadline_order_not_before_their_deadline() -> None:
    timers = TimerThread()
    timers.start()
    fired: list[tuple[str, int]] = []
    done = threading.Event()
    now = timers.now_ns()
    timers.schedule(now + 30_000_000, lambda: (fired.append(("late", timers.now_ns())), done.set()))
    timers.schedule(now + 10_000_000, lambda: fired.append(("early", timers.now_ns())))
    assert done.wait(5)
    timers.stop()
    assert [name for name, _ in fired] == ["early", "late"]
    assert fired[0][1] >= now + 10_000_000
    assert fired[1][1] >= now + 30_000_000


def test_cancelled_callback_never_runs() -> None:
    timers = TimerThread()
    timers.start()
    fired: list[str] = []
    done = threading.Event()
    now = timers.now_ns()
    handle = timers.schedule(now + 5_000_000, lambda: fired.append("cancelled"))
    timers.cancel(handle)
    timers.schedule(now + 20_000_000, done.set)
    assert done.wait(5)
    timers.stop()
    assert fired == []


def test_an_earlier_deadline_wakes_a_sleeping_timer_thread() -> None:
    timers = TimerThread()
    timers.start()
    done = threading.Event()
    timers.schedule(timers.now_ns() + 60_000_000_000, lambda: None)
    start = time.monotonic()
    timers.schedule(timers.now_ns() + 1_000_000, done.set)
    assert done.wait(5)
    assert time.monotonic() - start < 1
    timers.stop()


def test_a_failing_callback_is_kept_and_the_others_still_run() -> None:
    timers = TimerThread()
    timers.start()
    done = threading.Event()

    def broken() -> None:
        raise RuntimeError("device bug")

    now = timers.now_ns()
    timers.schedule(now + 1_000_000, broken)
    timers.schedule(now + 2_000_000, done.set)
    assert done.wait(5)
    timers.stop()
    assert len(timers.errors) == 1
    assert "device bug" in str(timers.errors[0])


def test_stop_is_idempotent_and_an_idle_thread_stops_at_once() -> None:
    timers = TimerThread()
    timers.start()
    start = time.monotonic()
    timers.stop()
    timers.stop()
    assert time.monotonic() - start < 1


def test_a_paused_clock_stands_still_and_fires_nothing_until_resumed() -> None:
    timers = TimerThread()
    timers.start()
    fired = threading.Event()
    start = timers.now_ns()
    timers.schedule(start + 300_000_000, fired.set)
    timers.pause()
    frozen = timers.now_ns()
    time.sleep(0.4)  # past the deadline in host time
    assert timers.now_ns() == frozen
    assert not fired.is_set()
    timers.resume()
    assert fired.wait(5)
    assert timers.now_ns() - start >= 300_000_000
    timers.stop()


def test_pause_waits_for_a_callback_in_flight() -> None:
    timers = TimerThread()
    timers.start()
    entered = threading.Event()
    finished: list[bool] = []

    def slow() -> None:
        entered.set()
        time.sleep(0.1)
        finished.append(True)

    timers.schedule(timers.now_ns(), slow)
    assert entered.wait(5)
    timers.pause()
    assert finished == [True]
    timers.resume()
    timers.stop()
