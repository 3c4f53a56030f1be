"""The dashboard's time series (pure, driven by hand) and its sampler and event streams
(driven by a FakeClock): bounded in points, TTFTs, streams and batches."""

from __future__ import annotations

import asyncio
import json

import pytest

from protos.v1 import queen_pb2
from queen.events import EventBus
from queen.http.dashboard import live
from queen.http.dashboard.live import Live, Stream
from queen.http.dashboard.series import Point, Series, percentile
from queen.registry import Registry
from queen.routing.desk import Desk
from queen.routing.router import Router
from tests.fakes import FakeClock, settle


def test_a_point_has_the_intervals_rates_ttft_percentiles_and_deepest_queue() -> None:
    series = Series(interval=5, span=60)
    for ttft in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        series.ended(True, ttft)
    series.ended(False, None)
    series.ended(True, float("nan"))  # a TTFT that is no number is not one
    series.queue_seen(3)
    series.queue_seen(1)
    point = series.close(wall=1000.0, elapsed=4.0)
    assert point == Point(1000.0, 12 / 4, 1 / 4, 0.5, 0.9, 3)
    quiet = series.close(wall=1005.0, elapsed=5.0)  # the next interval starts from nothing
    assert quiet == Point(1005.0, 0.0, 0.0, None, None, 0)
    assert quiet.as_json() == {
        "time": 1005.0, "requests_per_second": 0.0, "failed_per_second": 0.0,
        "ttft_p50": None, "ttft_p90": None, "queue_depth": 0,
    }  # fmt: skip


def test_the_series_keeps_its_span_and_a_bounded_number_of_ttfts() -> None:
    series = Series(interval=5, span=15 * 60, max_ttfts=100)
    for minute in range(20 * 12):
        for _ in range(1000):
            series.ended(True, 0.01)
        assert len(series._ttfts) <= 100
        series.close(wall=minute * 5.0, elapsed=5.0)
    assert len(series.points) == 180  # 15 minutes of 5-second points
    assert series.points[0].time == (240 - 180) * 5.0


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.9) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.9) == 4.0


def test_a_series_needs_a_positive_interval_within_its_span() -> None:
    with pytest.raises(ValueError):
        Series(interval=0)
    with pytest.raises(ValueError):
        Series(interval=10, span=5)


def sampler(clock: FakeClock, max_streams: int = 2) -> tuple[Live, Desk, EventBus]:
    desk = Desk(Router(Registry(clock)))
    events = EventBus()
    return Live(Series(interval=5), events, desk, clock, max_streams), desk, events


async def test_the_sampler_closes_an_interval_every_five_seconds_and_tells_the_streams() -> None:
    clock = FakeClock()
    board, desk, _ = sampler(clock)
    stream = board.open()
    assert stream is not None
    board.start()
    desk.queued = 4  # seen at one look, gone by the end of the interval
    await clock.run(1.0)
    desk.queued = 0
    await clock.run(4.0)
    assert [p.queue_depth for p in board.series.points] == [4]
    assert board.series.points[0].time == clock.time()
    await clock.run(10.0)
    assert len(board.series.points) == 3
    assert len(stream.points) == 3 and stream.subscriber.wake.is_set()
    board.stop()
    await settle()
    assert board.sampler is not None and board.sampler.cancelled()


async def test_a_sampler_step_that_fails_is_logged_and_the_loop_goes_on() -> None:
    clock = FakeClock()
    board, _, _ = sampler(clock)
    broken = {"times": 0}

    def step(started: float) -> float:
        broken["times"] += 1
        raise RuntimeError("boom")

    board.step = step  # type: ignore[method-assign]
    board.start()
    await clock.run(3.0)
    assert broken["times"] == 3 and board.sampler is not None and not board.sampler.done()
    board.stop()
    await settle()


def event(number: int) -> queen_pb2.Event:
    return queen_pb2.Event(kind=queen_pb2.EVENT_KIND_REQUEST_STARTED, request_id=str(number))


async def test_streams_are_bounded_and_closing_one_ends_its_subscription() -> None:
    board, _, events = sampler(FakeClock(), max_streams=2)
    first, second = board.open(), board.open()
    assert first is not None and second is not None
    assert board.open() is None  # the third is refused
    assert events.watched
    board.close(first)
    board.close(second)
    assert not events.watched and not board.streams
    assert board.open() is not None


def test_a_batch_sends_the_newest_events_and_counts_the_rest_as_dropped() -> None:
    board, _, events = sampler(FakeClock())
    stream = board.open()  # as a page's stream is opened
    assert stream is not None
    total = live.MAX_BATCH + 850
    events.publish(event(n) for n in range(total))
    (sent,) = stream.batch()
    kind, data = sent.decode().split("\n", 1)
    assert kind == "event: events"
    body = json.loads(data.removeprefix("data: "))
    assert body["dropped"] == total - live.MAX_BATCH
    assert len(body["events"]) == live.MAX_BATCH
    assert body["events"][-1]["request_id"] == str(total - 1)
    assert body["events"][0]["kind"] == "EVENT_KIND_REQUEST_STARTED"
    assert stream.batch() == []


async def test_a_stream_sends_batches_keepalives_and_says_bye_when_ending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(live, "KEEPALIVE", 0.01)
    monkeypatch.setattr(live, "BATCH_PAUSE", 0)
    events = EventBus()
    stream = Stream(events.subscribe())
    messages = stream.messages()
    assert await anext(messages) == b"retry: 2000\n\n"
    assert await asyncio.wait_for(anext(messages), 1) == b": keepalive\n\n"
    events.publish([event(1)])
    first = await asyncio.wait_for(anext(messages), 1)
    assert first.startswith(b"event: events\n")
    stream.points.append(Point(1.0, 0.0, 0.0, None, None, 0))
    stream.ending = True
    stream.wake()
    rest = [chunk async for chunk in messages]
    assert rest[0].startswith(b"event: point\n") and rest[-1].startswith(b"event: bye\n")
