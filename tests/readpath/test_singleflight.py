"""The single-flight algorithm: wait schedules and in-process flights, without Redis."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachewarden.errors import LoadFailed
from cachewarden.readpath.singleflight import FlightTimeout, LocalFlights, Renewer, Role, WaitPolicy
from tests.helpers import wait_for


@given(
    st.integers(min_value=1, max_value=5_000),
    st.floats(min_value=1, max_value=50),
    st.floats(min_value=1.0, max_value=4.0),
    st.floats(min_value=1, max_value=500),
)
def test_wait_schedule_is_bounded(
    timeout_ms: int, first_ms: float, factor: float, max_ms: float
) -> None:
    """Sleeps are positive, never above the cap, never past the deadline, and end with None."""
    policy = WaitPolicy(timeout_ms, first_ms=first_ms, factor=factor, max_ms=max(max_ms, first_ms))
    now = 100.0
    waiter = policy.sleeps(now)
    total = 0.0
    previous = 0.0
    for _ in range(10_000):
        sleep = waiter.next_sleep(now)
        if sleep is None:
            break
        assert 0 < sleep <= policy.max_ms / 1000 + 1e-12
        assert sleep >= min(previous, waiter.deadline - now) - 1e-12
        previous = sleep
        now += sleep
        total += sleep
    else:
        pytest.fail("the schedule never ended")
    assert total == pytest.approx(timeout_ms / 1000, abs=1e-6)


def test_default_wait_polls_quickly_then_at_the_cap() -> None:
    """A waiter's first polls come within milliseconds, then every 10 ms: it lags a fill by 10 ms at most."""
    waiter = WaitPolicy(1000).sleeps(0.0)
    now, sleeps = 0.0, []
    for _ in range(8):
        sleep = waiter.next_sleep(now)
        assert sleep is not None
        sleeps.append(round(sleep * 1000, 3))
        now += sleep
    assert sleeps[0] == 2.0
    assert sleeps[-1] == 10.0
    assert max(sleeps) == 10.0


def test_roles_match_the_read_script() -> None:
    """The miss states read.lua returns map onto the roles the reader acts on."""
    assert [Role(n) for n in range(4)] == [
        Role.WAIT,
        Role.LOAD,
        Role.PENDING_WRITE,
        Role.FAILED,
    ]
    script = Path(__file__).parents[2] / "cachewarden" / "scripts" / "read.lua"
    assert "1 = this caller took the lease" in script.read_text()


def test_one_thread_leads_and_the_others_get_its_value() -> None:
    """Of 50 threads missing one key at once, exactly one leads; all get the leader's value."""
    flights: LocalFlights[str] = LocalFlights()
    start = threading.Barrier(50)
    leaders: list[int] = []
    results: list[str] = []
    lock = threading.Lock()

    def reader(n: int) -> None:
        start.wait()
        flight, leads = flights.join("user:1")
        if leads:
            with lock:
                leaders.append(n)
            threading.Event().wait(0.05)
            flight.resolve(f"row from {n}")
            flights.land("user:1", flight)
            value = f"row from {n}"
        else:
            value = flight.wait(5)
        with lock:
            results.append(value)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(leaders) == 1
    assert results == [f"row from {leaders[0]}"] * 50


def test_followers_get_their_own_copy_of_the_leaders_error() -> None:
    """A leader's failure reaches every follower as its own exception instance."""
    flights: LocalFlights[str] = LocalFlights()
    flight, leads = flights.join("k")
    again, second = flights.join("k")
    assert leads and not second and again is flight
    error = LoadFailed("user", "1", "loading from the database failed: boom")
    flight.fail(error)
    caught = []
    for _ in range(2):
        with pytest.raises(LoadFailed) as info:
            flight.wait(1)
        caught.append(info.value)
    assert caught[0] is not caught[1] and caught[0] is not error
    assert str(caught[0]) == "user:1: loading from the database failed: boom"


def test_a_landed_flight_lets_the_next_miss_start_a_new_one() -> None:
    """After the leader lands its flight, the next miss of the key leads a fresh flight."""
    flights: LocalFlights[str] = LocalFlights()
    flight, _ = flights.join("k")
    flight.resolve("v1")
    flights.land("k", flight)
    assert flights.current("k") is None
    fresh, leads = flights.join("k")
    assert leads and fresh is not flight


def test_a_follower_gives_up_after_its_timeout() -> None:
    """A follower of a flight that never finishes gets FlightTimeout, not a hang."""
    flights: LocalFlights[str] = LocalFlights()
    flight, _ = flights.join("k")
    with pytest.raises(FlightTimeout):
        flight.wait(0.05)


def test_a_renewer_extends_while_held_and_stops_when_released_or_lost() -> None:
    """A hold's extend runs every `every_s` while its block runs, and no more once the block has exited or extend has returned False."""
    renewer = Renewer()
    ticks: dict[str, int] = {"clock": 0, "held": 0, "lost": 0}

    def counter(name: str, keep: bool = True) -> Callable[[], bool]:
        def extend() -> bool:
            ticks[name] += 1
            return keep

        return extend

    def after(n: int) -> None:
        """Wait until the clock hold has ticked `n` more times."""
        target = ticks["clock"] + n
        wait_for(lambda: ticks["clock"] >= target, 5, interval=0.005, what="clock ticks")

    with renewer.hold(0.01, counter("clock")):
        with renewer.hold(0.01, counter("held")), renewer.hold(0.01, counter("lost", False)):
            wait_for(lambda: ticks["held"] >= 3, 5, interval=0.005, what="three extensions")
        released = ticks["held"]
        after(3)
        assert ticks["held"] == released
        assert ticks["lost"] == 1
