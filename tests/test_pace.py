"""batch.concurrency: auto: the controller's decisions on recorded metric sequences (pure logic)."""

from __future__ import annotations

import threading

from slurm_vllm.batch.pace import CEILING, FLOOR, START, Limit, Load, State, decide, headroom, parse_metrics

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
    """A server whose KV cache holds at most CAPACITY[i] requests during phase i (longer requests:
    fewer fit; full when more wait) with the driver keeping its limit in flight (a long input): the
    limits decided, step by step."""
    state, limits = State(start), []
    for cap in capacity:
        for _ in range(steps_each):
            in_flight = state.limit
            load = Load(running=min(in_flight, cap), waiting=max(0, in_flight - cap),
                        kv_usage=0.97 if in_flight > cap else 0.5)
            state = decide(state, in_flight, load)
            limits.append(state.limit)
    return limits


def test_it_grows_while_the_engine_takes_all_and_settles_just_above_what_runs() -> None:
    limits = simulate([300], 12)
    assert limits[:4] == [96, 144, 216, 324], limits                # grows by half while all run
    queue = limits[-1] - 300                                        # then what runs + a little queue
    assert 0 < queue <= 2 * headroom(300), limits                  # (a full KV cache: no more growth)
    assert len(set(limits[-6:])) == 1                               # and stays: no oscillation


def test_it_follows_the_engine_when_requests_get_longer_then_shorter_mid_file() -> None:
    limits = simulate([300, 100, 300], 16)
    assert limits[16] == limits[15], limits                         # one reading with a queue: waits
    assert limits[17] == 100 + headroom(100) == 125, limits         # two: what runs + headroom
    assert limits[31] == 125, limits                                # and stays
    assert 300 + headroom(300) / 2 <= limits[-1] <= 300 + 2 * headroom(300), limits  # back up: shorter


def live(capacity: int, seconds: int, admit: int) -> list[tuple[int, Load]]:
    """A closer server, as recorded from vLLM on the test bed: it takes in at most ADMIT new
    requests a second (the prefill token budget), a twelfth of what is in flight is between it and
    the driver (tokenizing, answering), and what runs at a reading is up to 30% under CAPACITY
    (requests finishing together). The (limit, load) of each reading."""
    jitter = [0.0, 0.03, 0.25, 0.08, 0.15, 0.3, 0.02, 0.12]   # as recorded: 89-121 ran under 128
    state, running, seen = State(START), 0.0, []
    for t in range(seconds):
        in_flight = state.limit
        engine = in_flight - in_flight // 12
        running = min(engine, int(capacity * (1 - jitter[t % len(jitter)])), running + admit)
        load = Load(running, engine - running, 0.3)
        state = decide(state, in_flight, load)
        seen.append((state.limit, load))
    return seen


def test_a_burst_being_taken_in_is_not_taken_for_a_full_engine() -> None:
    """vLLM 0.32 on 2 AVX2 CPUs at START: running 42, waiting 22 two readings in a row (prefills
    take in ~20-40 a second) — cutting the limit to 47 there cost seconds at a small batch."""
    for admit in (12, 8):
        seen = live(capacity=128, seconds=40, admit=admit)
        queued = [load for _, load in seen[:3] if load.waiting > 2 * headroom(load.running)]
        assert len(queued) >= 2, seen                               # the burst: a queue at 2+ readings
        assert min(limit for limit, _ in seen) >= START, seen


def test_at_the_engine_capacity_it_settles_instead_of_oscillating() -> None:
    """Recorded on 2 CPUs before this rule: the limit went 130 -> 195 -> 132 -> 198 -> 123 -> ...
    for the whole batch (waiting was 0 at some readings although the engine was full)."""
    for capacity in (128, 1024):
        seen = live(capacity, seconds=60, admit=capacity // 3)
        limits = [limit for limit, _ in seen[20:]]
        assert len(set(limits)) == 1, (capacity, limits)            # no change in the last 40 s
        assert capacity <= limits[0] <= capacity + 3 * headroom(capacity), (capacity, limits)


def test_a_full_kv_cache_stops_the_growth() -> None:
    assert decide(State(64), 64, Load(64, 0, 0.97)).limit == 64
    assert decide(State(64), 64, Load(64, 0, 0.50)).limit == 96


def test_it_does_not_grow_when_the_driver_itself_sends_less_than_its_limit() -> None:
    """The input's end, or a slow reader: less in flight than allowed says nothing of the server."""
    assert decide(State(200), 40, Load(40, 0, 0.1)).limit == 200


def test_bounds() -> None:
    stalled = decide(State(FLOOR), FLOOR, Load(0, 50, 0.1))
    assert decide(stalled, FLOOR, Load(0, 50, 0.1)).limit == FLOOR  # a stalled engine: never below FLOOR
    assert decide(State(CEILING), CEILING, Load(CEILING, 0, 0.1)).limit == CEILING


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
