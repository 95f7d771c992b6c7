"""batch.concurrency: auto: the controller's decisions on recorded metric sequences (pure logic)."""

from __future__ import annotations

import threading

from slurm_vllm.batch.pace import CEILING, FLOOR, START, Limit, Load, decide, headroom, parse_metrics

# What vLLM 0.32's /metrics says (two engines of one server: data-parallel ranks), trimmed.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 30.0
vllm:num_requests_running{engine="1",model_name="tiny"} 26.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.41
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.87
vllm:num_requests_running_total_bogus 5
"""


def test_the_load_is_summed_over_engines_and_servers_and_the_fullest_cache_counts() -> None:
    assert parse_metrics([VLLM_METRICS]) == Load(56.0, 3.0, 0.87)
    assert parse_metrics([VLLM_METRICS, VLLM_METRICS]) == Load(112.0, 6.0, 0.87)
    assert parse_metrics(["# not vllm\nprocess_cpu_seconds_total 3\n"]) is None
    assert parse_metrics([VLLM_METRICS, ""]) is None          # one replica unreadable: no decision
    assert parse_metrics([]) is None


def simulate(capacity: list[int], steps_each: int, start: int = START) -> list[int]:
    """A server that runs at most CAPACITY[i] at once during phase i (longer requests: fewer fit)
    with the driver keeping its limit in flight (a long input): the limits decided, step by step."""
    limit, limits = start, []
    for cap in capacity:
        for _ in range(steps_each):
            in_flight = limit
            load = Load(running=min(in_flight, cap), waiting=max(0, in_flight - cap), kv_usage=0.5)
            limit = decide(limit, in_flight, load)
            limits.append(limit)
    return limits


def test_it_grows_while_the_engine_takes_all_and_settles_just_above_what_runs() -> None:
    limits = simulate([300], 12)
    assert limits[:4] == [96, 144, 216, 324], limits                # grows by half while all run
    queue = limits[-1] - 300                                        # then what runs + a little queue
    assert headroom(300) / 2 <= queue <= 2 * headroom(300), limits
    assert len(set(limits[4:])) == 1                                # and stays: no oscillation


def test_it_follows_the_engine_when_requests_get_longer_then_shorter_mid_file() -> None:
    limits = simulate([300, 100, 300], 12)
    assert limits[12] == 100 + headroom(100) == 112, limits         # at once: a queue past 2 x headroom
    assert limits[23] == 112                                        # and stays
    assert limits[-1] == 300 + headroom(300) == 337                 # back up when they get shorter


def test_a_full_kv_cache_stops_the_growth() -> None:
    assert decide(64, 64, Load(64, 0, 0.97)) == 64
    assert decide(64, 64, Load(64, 0, 0.50)) == 96


def test_it_does_not_grow_when_the_driver_itself_sends_less_than_its_limit() -> None:
    """The input's end, or a slow reader: less in flight than allowed says nothing of the server."""
    assert decide(200, 40, Load(40, 0, 0.1)) == 200


def test_bounds() -> None:
    assert decide(FLOOR, FLOOR, Load(0, 50, 0.1)) == FLOOR         # a stalled engine: never below FLOOR
    assert decide(CEILING, CEILING, Load(CEILING, 0, 0.1)) == CEILING


def test_a_shrunk_limit_takes_effect_as_slots_come_back_and_a_grown_one_at_once() -> None:
    limit = Limit(3)
    assert all(limit.acquire(0.01) for _ in range(3)) and not limit.acquire(0.01)
    limit.resize(1)
    limit.release()
    limit.release()
    assert not limit.acquire(0.01)                                  # 1 held, limit 1
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(limit.acquire(5)))
    waiter.start()
    limit.resize(4)
    waiter.join(5)
    assert got == [True] and limit.used == 2
