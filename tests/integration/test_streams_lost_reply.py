"""A write Redis ran whose reply never came back (Redis killed, or the connection cut, between executing a
command and answering it): the client retries, and the retry must not write twice.

This is what failed `kill-redis-step2`'s prompt audit twice in a row: the feeder's enqueue of a step's
prompts ran, Redis was SIGKILLed before it answered, the retry enqueued the step a second time, and the
prompts stream held those prompts twice. A real TCP proxy in front of a real Redis drops the first reply.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
import redis

from cadence import streams
from cadence.v1 import common_pb2


class ReplyCutter:
    """Forwards TCP to Redis; drops the connection instead of passing on the reply to the first request that
    carries `marker` (Redis has run that command; its answer is lost)."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        self.upstream_port, self.marker = upstream_port, marker
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_replies = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            armed = threading.Event()
            threading.Thread(target=self._pipe, args=(client, upstream, armed, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, armed, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, armed: threading.Event, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if not replies and self.marker in data and self.cut_replies == 0:
                    armed.set()
                if replies and armed.is_set() and self.cut_replies == 0:
                    self.cut_replies += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def cutter(redis_url: str) -> Iterator[ReplyCutter]:
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    proxy = ReplyCutter(port, marker=b"t0.0")
    yield proxy
    proxy.close()


def prompts(n: int) -> list[common_pb2.Prompt]:
    return [common_pb2.Prompt(prompt_id=f"t0.{i}", text=f"{i}+{i}=") for i in range(n)]


def test_an_enqueue_retried_after_a_lost_reply_is_written_once(redis_url: str, cutter: ReplyCutter) -> None:
    through_proxy = streams.connect(f"redis://127.0.0.1:{cutter.port}/0")
    direct = redis.Redis.from_url(redis_url)
    direct.script_load(streams._ADD_WITH_POSITION_LUA)  # EVALSHA finds it: the cut reply is the enqueue's
    streams.add_with_meta(through_proxy, "lost-reply", "prompts", prompts(4), "feeder_next_step", 1)
    assert cutter.cut_replies == 1, "the proxy never cut a reply: the test did not exercise a retry"
    assert direct.xlen(streams.stream_key("lost-reply", "prompts")) == 4, "the retry enqueued the prompts twice"
    assert streams.read_meta(direct, "lost-reply")["feeder_next_step"] == "1"
