"""Three real gateway processes sharing one control plane through one real redis-server on
loopback: a change made through any replica reaches all of them (propagation measured), a
rollback through any replica takes effect everywhere with exactly one audit entry, sticky
keys map identically on every replica, a Redis crash under traffic fails no request (admin
writes answer 503; replicas resync when it returns) and the controller lease moves to
another replica when the leader is killed or paused (a resumed ex-leader does not take it
back). Durations are bounded: the module runs in well under a minute on two cores."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway import admin_client
from gateway.store import RedisStore
from tests.clients import client, infer
from tests.redis_server import RedisServer

OPERATOR = "fleet-operator-secret-01"
CLUSTER = "fleet"
LEASE_TTL_S = 1.0
START_TIMEOUT_S = 120.0
X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)
BODY = {
    "inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": X.ravel().tolist()}]
}
LONG_POLICY = {"steps": [10, 100], "step_duration_s": 3600, "min_samples": 1_000_000}
_LISTENING = re.compile(r"on HTTP [\d.]+:(\d+) and gRPC [\d.]+:(\d+) \(admin [\d.]+:(\d+)\)")


@dataclass
class Replica:
    process: subprocess.Popen[str]
    http_port: int
    admin_port: int
    lines: list[str] = field(default_factory=list)
    drain: threading.Thread | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.admin_port}/admin/v1",
            headers={"Authorization": f"Bearer {OPERATOR}"},
            timeout=10,
        )


def _start_replica(repo: Path, data: Path, url: str) -> Replica:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_DATA_DIR=str(data),
        GATEWAY_ADMIN__PORT="0",
        GATEWAY_ADMIN__TOKENS=f'[{{name = "ops", role = "operator", token = "{OPERATOR}"}}]',
        GATEWAY_STORE__URL=url,
        GATEWAY_STORE__CLUSTER=CLUSTER,
        GATEWAY_STORE__LEASE_TTL_S=str(LEASE_TTL_S),
        GATEWAY_STORE__RESYNC_INTERVAL_S="1.0",
        GATEWAY_STORE__HEARTBEAT_TTL_S="2.0",
        GATEWAY_LOG_FORMAT="text",
        GATEWAY_GRACE_PERIOD_S="2",
        # Short drift epochs: counts seen on one replica reach the pool within a second.
        GATEWAY_DRIFT__SUB_WINDOW_S="0.25",
        GATEWAY_DRIFT__SUB_WINDOWS="120",
        GATEWAY_DRIFT__TICK_S="0.05",
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(repo)]
    cmd += ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        match = _LISTENING.search(line)
        if match:
            drain = threading.Thread(target=_drain, args=(proc, lines), daemon=True)
            drain.start()
            return Replica(proc, int(match.group(1)), int(match.group(3)), lines, drain)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError("replica did not start:\n" + "".join(lines[-30:]))


def _drain(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        del lines[:-200]


@dataclass
class Fleet:
    redis: RedisServer
    replicas: list[Replica]

    def store(self) -> RedisStore:
        return RedisStore(self.redis.url, cluster=CLUSTER)


@pytest.fixture(scope="module")
def fleet(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    repo = root / "repo"
    repo.mkdir()
    (repo / "pair").symlink_to(repository / "pair")
    (repo / "breast_cancer").symlink_to(repository / "breast_cancer")
    redis_server = RedisServer(root / "redis").start()
    replicas: list[Replica] = []
    try:
        for n in range(3):
            replicas.append(_start_replica(repo, root / f"data{n}", redis_server.url))
        yield Fleet(redis_server, replicas)
    finally:
        for replica in replicas:
            proc = replica.process
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if replica.drain is not None:
                replica.drain.join(5)
            if proc.stdout is not None:
                proc.stdout.close()
        redis_server.kill()


def _weights(route: dict[str, Any] | None) -> dict[str, float]:
    if not route:
        return {}
    return {v["version"]: float(v["weight"]) for v in route["variants"]}


def _route_of(client: httpx.Client, model: str = "pair") -> dict[str, float]:
    return _weights(client.get("/routes").json()["routes"].get(model))


def _wait(predicate: Any, timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` holds (polled every 2 ms); fails after ``timeout_s``."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, what
        time.sleep(0.002)
    return time.monotonic() - started


def _live(fleet: Fleet) -> list[Replica]:
    return [r for r in fleet.replicas if r.process.poll() is None]


def test_weight_changes_through_random_replicas_reach_every_replica(fleet: Fleet) -> None:
    clients = [r.admin() for r in fleet.replicas]
    rng = random.Random(7)
    lags: list[float] = []
    changes = 300  # the 200 probed changes and 300 changes in one audit chain
    for n in range(changes):
        weight = float(rng.randint(1, 99))
        wanted = {"1": 100.0 - weight, "3": weight}
        writer = rng.randrange(3)
        reply = clients[writer].put(
            "/routes/pair/weights", json={"weights": wanted, "reason": f"change {n}"}
        )
        assert reply.status_code == 200, reply.text
        for i, other in enumerate(clients):
            if i != writer:
                lags.append(
                    _wait(
                        lambda o=other, w=wanted: _route_of(o) == w, 5.0, f"replica {i} change {n}"
                    )
                )
    lags.sort()
    p99 = lags[int(len(lags) * 0.99) - 1]
    print(
        f"\npropagation over {len(lags)} probes: p50 {lags[len(lags) // 2] * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms"
    )
    assert lags[-1] < 5.0  # generous: the acceptance numbers are reported, not flaked on
    audit = clients[0].get("/audit/verify").json()
    assert audit["ok"], audit
    entries = clients[1].get("/audit", params={"model": "pair", "limit": 1000}).json()
    entries = entries if isinstance(entries, list) else entries["entries"]
    assert sum(e["action"] == "set_weights" for e in entries) >= changes
    for c in clients:
        c.close()


def _sticky_map(replica: Any, keys: list[str]) -> list[str]:
    with httpx.Client(base_url=replica.http, timeout=10) as http:
        return [
            http.post("/v2/models/pair/infer", json=BODY, headers={"x-routing-key": key}).json()[
                "model_version"
            ]
            for key in keys
        ]


def test_sticky_keys_map_identically_on_every_replica_across_a_change(fleet: Fleet) -> None:
    clients = [r.admin() for r in fleet.replicas]
    keys = [f"key-{k}" for k in range(1000)]
    maps = {}
    for share in (10.0, 20.0):
        wanted = {"1": 100.0 - share, "3": share}
        reply = clients[0].put(
            "/routes/pair/weights", json={"weights": wanted, "reason": f"{share:g}%"}
        )
        assert reply.status_code == 200, reply.text
        for c in clients:
            _wait(lambda c=c, w=wanted: _route_of(c) == w, 5.0, f"{share:g}% everywhere")
        per_replica = [_sticky_map(r, keys) for r in fleet.replicas]
        assert per_replica[0] == per_replica[1] == per_replica[2]
        maps[share] = per_replica[0]
        print(f"\n{share:g}%: {maps[share].count('3')} of {len(keys)} keys on the candidate")
    # Sticky: a key on the candidate at 10% stays there at 20%.
    assert all(b == "3" for a, b in zip(maps[10.0], maps[20.0], strict=True) if a == "3")
    for c in clients:
        c.close()


def test_rollback_through_any_replica_reaches_all_with_one_audit_entry(fleet: Fleet) -> None:
    clients = [r.admin() for r in fleet.replicas]
    started = clients[0].post(
        "/rollouts",
        json={"model": "pair", "stable": "1", "candidate": "3", "policy": LONG_POLICY},
    )
    assert started.status_code == 201, started.text
    for c in clients:
        _wait(lambda c=c: _route_of(c) == {"1": 90.0, "3": 10.0}, 5.0, "canary everywhere")
    # Sticky keys map identically on every replica (same weights, same pure function).
    keys = [f"user-{k}" for k in range(150)]
    maps = []
    for replica in fleet.replicas:
        with httpx.Client(base_url=replica.http, timeout=10) as http:
            maps.append(
                [
                    http.post(
                        "/v2/models/pair/infer", json=BODY, headers={"x-routing-key": key}
                    ).json()["model_version"]
                    for key in keys
                ]
            )
    assert maps[0] == maps[1] == maps[2]
    assert set(maps[0]) == {"1", "3"}
    done = clients[2].post("/rollouts/pair/rollback", json={"reason": "bad"})
    assert done.status_code == 200, done.text
    for c in clients:
        # Milliseconds when idle (measured in the first test); the bound leaves room for a
        # loaded CI machine instead of flaking.
        _wait(lambda c=c: _route_of(c) == {"1": 100.0, "3": 0.0}, 5.0, "rollback everywhere")
        assert c.get("/rollouts/pair").json()["status"] == "rolled_back"
    second = clients[1].post("/rollouts/pair/rollback", json={"reason": "again"})
    assert second.status_code == 409, second.text
    entries = clients[1].get("/audit", params={"model": "pair", "limit": 1000}).json()
    entries = entries if isinstance(entries, list) else entries["entries"]
    assert [e["action"] for e in entries].count("rollback") == 1
    assert clients[1].get("/audit/verify").json()["ok"]
    for c in clients:
        c.close()


def test_redis_crash_fails_no_request_and_replicas_resync(fleet: Fleet) -> None:
    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def load(replica: Replica) -> None:
        with httpx.Client(base_url=replica.http, timeout=10) as http:
            while not stop.is_set():
                try:
                    reply = http.post("/v2/models/pair/infer", json=BODY)
                    if reply.status_code != 200:
                        failures.append(reply.text)
                    served[0] += 1
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load, args=(r,)) for r in fleet.replicas]
    for t in threads:
        t.start()
    clients = [r.admin() for r in fleet.replicas]
    try:
        time.sleep(0.3)
        fleet.redis.kill()
        began = time.monotonic()
        refused = clients[1].put("/routes/pair/weights", json={"weights": {"1": 50, "3": 50}})
        assert refused.status_code == 503, refused.text
        assert "control store" in refused.text
        refused_after = time.monotonic() - began
        assert refused_after < 5.0
        assert _route_of(clients[1]) == {"1": 100.0, "3": 0.0}  # the refused change undone
        time.sleep(2.0)
        fleet.redis.start()
        wanted = {"1": 70.0, "3": 30.0}
        back = _wait(
            lambda: (
                clients[0].put("/routes/pair/weights", json={"weights": wanted}).status_code == 200
            ),
            10.0,
            "writes accepted again",
        )
        resynced = max(_wait(lambda c=c: _route_of(c) == wanted, 5.0, "resynced") for c in clients)
        print(
            f"\nRedis down: admin write refused in {refused_after * 1000:.0f} ms; after its "
            f"restart writes accepted in {back:.2f} s, change on every replica "
            f"{resynced * 1000:.0f} ms later"
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert served[0] > 0
    assert failures == []
    assert clients[0].get("/audit/verify").json()["ok"]
    for c in clients:
        c.close()


def _requests(counts: dict[str, Any]) -> int:
    return sum(int(np.sum(v)) for k, v in counts.items() if k.endswith("\x1frequests"))


def test_pooled_traffic_is_the_exact_sum_of_the_replicas_counts(fleet: Fleet) -> None:
    store = fleet.store()
    try:
        # Right after the Redis restart of the test before, a beat or two may still fail
        # (the restarted store still holds the old counters): wait for a beat from every
        # replica since now, so that what it counted before is published.
        _wait(lambda: len(store.pooled("traffic:pair").contributors) == 3, 10.0, "3 replicas")
        t0 = time.time()
        _wait(
            lambda: sum(r.last_seen > t0 for r in store.replicas()) == 3,
            10.0,
            "a beat from every replica",
        )
        # Counters of earlier traffic are published within a beat (0.5 s): wait until stable.
        before = store.pooled("traffic:pair")
        for _ in range(10):
            time.sleep(0.6)
            settled, before = before, store.pooled("traffic:pair")
            if _requests(settled.counts) == _requests(before.counts):
                break
        sent = {}
        for n, replica in zip((5, 7, 9), fleet.replicas, strict=True):
            with httpx.Client(base_url=replica.http, timeout=10) as http:
                for _ in range(n):
                    assert http.post("/v2/models/pair/infer", json=BODY).status_code == 200
            sent[replica.http_port] = n
        by_port = {int(r.address.rsplit(":", 1)[1]): r.incarnation for r in store.replicas()}

        def grown() -> bool:
            now = store.pooled("traffic:pair")
            return _requests(now.counts) == _requests(before.counts) + sum(sent.values())

        _wait(grown, 10.0, "every replica published its counters")
        after = store.pooled("traffic:pair")
        for port, n in sent.items():
            inc = by_port[port]
            mine = _requests(after.per_incarnation[inc]) - _requests(before.per_incarnation[inc])
            assert mine == n
        assert sorted(after.contributors) == sorted(by_port.values())
    finally:
        store.close()


def test_the_fleet_endpoint_lists_three_replicas_with_one_leader(fleet: Fleet) -> None:
    with fleet.replicas[0].admin() as admin:

        def listed() -> bool:
            view = admin.get("/fleet").json()
            return len(view["replicas"]) == 3 and all(r["alive"] for r in view["replicas"])

        _wait(listed, 10.0, "3 live replicas")
        _wait(lambda: admin.get("/fleet").json()["leader"] is not None, 10.0, "a leader")
        view = admin.get("/fleet").json()
        replicas = view["replicas"]
        assert view["shared"] is True
        assert sum(r["is_leader"] for r in replicas) == 1
        assert [r["id"] for r in replicas if r["is_leader"]] == [view["leader"]]
        assert [r["id"] for r in replicas if r["is_self"]] == [view["self"]]
        ports = {int(r["address"].rsplit(":", 1)[1]) for r in replicas}
        assert ports == {r.http_port for r in fleet.replicas}
        assert all(r["position"] and r["lag_s"] is not None for r in replicas)
        assert all(r["heartbeat_age_s"] < 5 for r in replicas)

        metrics = f"http://127.0.0.1:{fleet.replicas[0].admin_port}/metrics"
        _wait(lambda: "gateway_fleet_replicas 3.0" in httpx.get(metrics).text, 10.0, "gauges")
        text = httpx.get(metrics).text
        assert "gateway_control_lag_seconds" in text
        assert "gateway_controller_leader" in text
    out = io.StringIO()
    env = {
        "GATEWAY_ADMIN_URL": f"http://127.0.0.1:{fleet.replicas[0].admin_port}",
        "GATEWAY_ADMIN_TOKEN": OPERATOR,
    }
    assert admin_client.main(["fleet"], env=env, stdout=out, stderr=io.StringIO()) == 0
    table = out.getvalue().splitlines()
    assert len(table) == 4  # the header and three replicas
    assert sum(" leader " in line for line in table) == 1


def test_drift_seen_on_one_replica_shows_in_the_leaders_pooled_report(
    fleet: Fleet, repository: Path
) -> None:
    store = fleet.store()
    try:
        port = _leader(store)
    finally:
        store.close()
    leader = next(r for r in fleet.replicas if r.http_port == port)
    other = next(r for r in fleet.replicas if r.http_port != port)
    reference = np.load(repository / "breast_cancer" / "reference.npy")
    rng = np.random.default_rng(5)
    rows = 0
    conn = client("http", f"127.0.0.1:{other.http_port}")
    for _ in range(20):
        batch = reference[rng.integers(0, len(reference), 60)].copy()
        batch[:, 0] *= 1.4  # "mean radius" shifts, on this replica only
        infer("http", "", "breast_cancer", {"features": batch}, version="1", connection=conn)
        rows += 60
    conn.close()
    with leader.admin() as admin:

        def pooled() -> bool:
            report = admin.get("/drift/breast_cancer/1").json()
            return bool(report["inputs"]) and report["inputs"][0]["n"] >= rows

        _wait(pooled, 15.0, "the shifted rows in the leader's pooled report")
        report = admin.get("/drift/breast_cancer/1").json()
    assert report["replicas"] == 3
    assert report["inputs"][0]["n"] == rows  # the leader served none of them
    assert (report["inputs"][0]["name"], report["inputs"][0]["verdict"]) == ("mean radius", "drift")


def test_a_failing_canary_is_rolled_back_once_by_the_leader_everywhere(fleet: Fleet) -> None:
    clients = [r.admin() for r in fleet.replicas]
    policy = {
        "steps": [50, 100],
        "step_duration_s": 600,
        "evaluation_interval_s": 0.1,
        "min_samples": 10,
        "consecutive_failures": 2,
    }
    started = clients[1].post(
        "/rollouts", json={"model": "pair", "stable": "1", "candidate": "4", "policy": policy}
    )
    assert started.status_code == 201, started.text
    stop = threading.Event()

    def load(replica: Replica) -> None:  # version 4 fails every request
        with httpx.Client(base_url=replica.http, timeout=10) as http:
            while not stop.is_set():
                http.post("/v2/models/pair/infer", json=BODY)

    threads = [threading.Thread(target=load, args=(r,)) for r in fleet.replicas]
    for t in threads:
        t.start()
    try:
        _wait(
            lambda: clients[0].get("/rollouts/pair").json()["status"] == "rolled_back",
            30.0,
            "rolled back by the leader",
        )
        for c in clients:
            _wait(lambda c=c: _route_of(c) == {"1": 100.0, "4": 0.0}, 5.0, "stopped everywhere")
    finally:
        stop.set()
        for t in threads:
            t.join()
    entries = clients[2].get("/audit", params={"model": "pair", "limit": 1000}).json()
    entries = entries if isinstance(entries, list) else entries["entries"]
    since_start = entries[: next(i for i, e in enumerate(entries) if e["action"] == "start")]
    rollbacks = [e for e in since_start if e["action"] == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["actor"] == "controller"
    assert clients[2].get("/audit/verify").json()["ok"]
    for c in clients:
        c.close()


def test_feedback_posted_to_another_replica_joins_where_it_was_served(fleet: Fleet) -> None:
    served_by, posted_to = fleet.replicas[0], fleet.replicas[1]
    with (
        httpx.Client(base_url=served_by.http, timeout=10) as a,
        httpx.Client(base_url=posted_to.http, timeout=10) as b,
    ):

        def joined() -> int:
            versions = a.get("/v2/models/pair/outcomes").json().get("versions", {})
            return int(versions.get("1", {}).get("n", 0))

        before = joined()
        ids = [f"fleet-fb-{n}" for n in range(20)]
        for rid in ids:
            reply = a.post("/v2/models/pair/infer", json={**BODY, "id": rid})
            assert reply.json()["model_version"] == "1"
        result = b.post(
            "/v2/models/pair/feedback", json={"items": [{"id": i, "truth": 0} for i in ids]}
        ).json()
        assert result["unknown_ids"] == 20  # not held here: forwarded to the fleet
        _wait(lambda: joined() == before + 20, 10.0, "joined on the serving replica")


def _leader_port(store: RedisStore) -> int | None:
    lease = store.lease()
    if lease is None:
        return None
    for replica in store.replicas():
        if replica.incarnation == lease.holder:
            return int(replica.address.rsplit(":", 1)[1])
    return None


def _leader(store: RedisStore) -> int:
    """The leader's HTTP port, once some replica holds the lease."""
    found: list[int] = []

    def held() -> bool:
        port = _leader_port(store)
        found[:] = [] if port is None else [port]
        return port is not None

    _wait(held, 10.0, "a leader")
    return found[0]


def test_the_lease_moves_when_the_leader_is_paused_or_killed(fleet: Fleet) -> None:
    store = fleet.store()
    try:
        port = _leader(store)
        token = store.lease().token  # type: ignore[union-attr]
        paused = next(r for r in fleet.replicas if r.http_port == port)
        os.kill(paused.process.pid, signal.SIGSTOP)
        try:
            took = _wait(
                lambda: _leader_port(store) not in (None, port), 3 * LEASE_TTL_S + 4, "failover"
            )
            print(f"\nlease moved {took:.2f} s after SIGSTOP (TTL {LEASE_TTL_S} s)")
            time.sleep(3 * LEASE_TTL_S)
        finally:
            os.kill(paused.process.pid, signal.SIGCONT)
        new = store.lease()
        assert new is not None
        assert new.token > token
        time.sleep(LEASE_TTL_S)  # the resumed ex-leader finds its lease gone
        # Its stale tenure never comes back: any later lease (a heavily loaded machine may
        # let the new one lapse) has a newer token.
        current = store.lease()
        assert current is None or current.token >= new.token
        with httpx.Client(base_url=paused.http, timeout=10) as http:
            assert http.post("/v2/models/pair/infer", json=BODY).status_code == 200
        # A heavily loaded machine may let the lease lapse between holders: wait for one.
        leader = next(r for r in fleet.replicas if r.http_port == _leader(store))
        leader.process.kill()
        leader.process.wait()
        took = _wait(
            lambda: _leader_port(store) not in (None, leader.http_port),
            3 * LEASE_TTL_S + 4,
            "failover after kill -9",
        )
        print(f"lease moved {took:.2f} s after kill -9")
        last = store.lease()
        assert last is not None
        assert last.token > new.token
        entries = store.audit(limit=1000)
        assert store.verify_audit().ok
        assert json.dumps([e.action for e in entries])
    finally:
        store.close()
