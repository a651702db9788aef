"""AlertSender against a real local HTTP server: delivery, retries, give-up, drops."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.alerts import AlertSender
from gateway.errors import InvalidInputError


class Hook:
    """A webhook receiver: answers ``statuses`` in turn (then 200), records every body."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.attempts = 0
        self.delivered = threading.Event()
        self.gate: threading.Event | None = None
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if hook.gate is not None:
                    hook.gate.wait(10)
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                hook.attempts += 1
                status = hook.statuses.pop(0) if hook.statuses else 200
                if status == 200:
                    hook.bodies.append(body)
                    hook.paths.append(self.path)
                    hook.headers.append(dict(self.headers))
                    hook.delivered.set()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-path"

    def __enter__(self) -> Hook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    with Hook() as h:
        yield h


def test_delivers_json_body_to_every_url(hook: Hook) -> None:
    with Hook() as other:
        sender = AlertSender([hook.url, other.url], clock=lambda: 123.0)
        assert sender.send(
            "rollout.rolled_back",
            "m",
            "error rate",
            {"candidate_error_rate": 0.2, "psi": float("nan")},
            {"candidate_version": "2"},
        )
        sender.close()
        assert other.bodies == hook.bodies
    assert hook.bodies == [
        {
            "event": "rollout.rolled_back",
            "model": "m",
            "reason": "error rate",
            "values": {"candidate_error_rate": 0.2, "psi": None},
            "time": 123.0,
            "candidate_version": "2",
        }
    ]
    assert hook.paths == ["/hooks/secret-path"]
    assert hook.headers[0]["Content-Type"] == "application/json"
    assert (sender.sent, sender.failed, sender.dropped) == (2, 0, 0)


def test_retries_after_a_failed_attempt() -> None:
    with Hook(statuses=[500, 503]) as hook:
        sender = AlertSender([hook.url], retries=3, backoff_s=0.001)
        sender.send("e", "m", "r", {})
        assert hook.delivered.wait(10)
        sender.close()
    assert hook.attempts == 3
    assert len(hook.bodies) == 1
    assert (sender.sent, sender.failed) == (1, 0)


def test_gives_up_after_retries_and_logs_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    with Hook(statuses=[500] * 10) as hook:
        sender = AlertSender([hook.url], retries=2, backoff_s=0.001)
        sender.send("e", "m", "r", {})
        sender.close()
    assert hook.attempts == 3
    assert (sender.sent, sender.failed) == (0, 1)
    assert "given up" in caplog.text
    assert "secret-path" not in caplog.text


def test_unreachable_url_fails_without_raising() -> None:
    with Hook() as hook:
        url = hook.url
    sender = AlertSender([url], retries=1, backoff_s=0.001, timeout_s=1.0)
    assert sender.send("e", "m", "r", {})
    sender.close()
    assert (sender.sent, sender.failed) == (0, 1)


def test_full_queue_drops_and_counts(hook: Hook) -> None:
    hook.gate = threading.Event()
    sender = AlertSender([hook.url], queue_size=2)
    results = [sender.send("e", "m", str(i), {}) for i in range(10)]
    # The worker holds at most one event in flight and two queued; the rest are dropped.
    assert results.count(False) >= 7
    assert sender.dropped == results.count(False)
    hook.gate.set()
    sender.close()
    assert sender.sent == results.count(True)
    assert sender.send("e", "m", "after close", {}) is False
    assert sender.dropped == results.count(False) + 1


def test_no_urls_is_a_no_op() -> None:
    sender = AlertSender([])
    assert sender.send("e", "m", "r", {})
    sender.close()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/y", "nonsense"])
def test_only_http_urls(url: str) -> None:
    with pytest.raises(InvalidInputError):
        AlertSender([url])


def test_slack_and_teams_formats_beside_the_generic_body() -> None:
    with Hook() as generic, Hook() as slack, Hook() as teams:
        sender = AlertSender(
            [generic.url, slack.url + "/s", teams.url + "/t"],
            formats={slack.url + "/s": "slack", teams.url + "/t": "teams"},
            clock=lambda: 5.0,
        )
        sender.send("rollout.rolled_back", "m", "p99 ratio 3.1 > 2", {"p99_ratio": 3.14159})
        sender.close()
        assert sender.counts() == {"sent": 3, "failed": 0, "dropped": 0}
    assert generic.bodies[0]["event"] == "rollout.rolled_back"
    message = slack.bodies[0]
    assert message["text"] == "gateway: rollout.rolled_back of m: p99 ratio 3.1 > 2"
    block = message["blocks"][0]
    assert block["type"] == "section"
    assert "p99_ratio: `3.142`" in block["text"]["text"]
    card = teams.bodies[0]["attachments"][0]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    content = card["content"]
    assert (content["type"], content["version"]) == ("AdaptiveCard", "1.4")
    assert content["body"][0]["text"] == "gateway: rollout.rolled_back of m"
    assert content["body"][2]["facts"] == [{"title": "p99_ratio", "value": "3.142"}]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="slack"):
        AlertSender(["http://127.0.0.1:9/x"], formats={"http://127.0.0.1:9/x": "email"})
