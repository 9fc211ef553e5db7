"""`coralline bench pipeline`: the delay proxy on its own, and the quick bench end to end (real
drafter and verifier processes, real SmolLM2)."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
import time

import pytest

from coralline.bench import pipeline as pipeline_bench
from coralline.bench.proxy import DelayProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_delay_proxy_keeps_bytes_in_order_and_delays_each_direction():
    delay = 0.05
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream = f"127.0.0.1:{server.server_address[1]}"
    try:
        with (
            DelayProxy(delay, upstream) as proxy,
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
        ):
            t0 = time.perf_counter()
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
            assert time.perf_counter() - t0 >= 2 * delay  # one delay each way
            payload = os.urandom(300_000)  # many chunks: order and content survive
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            assert _recv_exactly(sock, len(payload)) == payload
            sender.join(10)
            assert proxy.connections == 1
            assert proxy.bytes_up == proxy.bytes_down == len(payload) + 4
    finally:
        server.shutdown()
        server.server_close()


def test_config_validation_and_quick_preset():
    q = pipeline_bench.PipelineConfig.quick()
    assert (q.prompts, q.max_new_tokens, q.temperature, q.delay_ms) == (2, 24, 0.0, 2.0)
    with pytest.raises(ValueError, match="drafter"):
        pipeline_bench.PipelineConfig(drafter="none")
    with pytest.raises(ValueError, match=">= 1"):
        pipeline_bench.PipelineConfig(prompts=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_pipeline_bench_end_to_end(tmp_path):
    out = tmp_path / "pipeline.json"
    pipeline_bench.main(str(out), quick=True, command="coralline bench pipeline --quick")
    rep = json.loads(out.read_text())
    assert set(rep["modes"]) == {"in_process", "split", "split_delayed"}
    assert rep["identical"]["split"] == [True, True]  # greedy: the split run is lossless
    assert rep["identical"]["delayed"] == [True, True]
    for mode in ("split", "split_delayed"):
        m = rep["modes"][mode]
        assert m["bytes_to_drafter_per_round"] > 0 and m["bytes_from_drafter_per_round"] > 0
        assert m["tokens"] == rep["modes"]["in_process"]["tokens"] > 0
    assert rep["ratios"]["split_over_in_process"] > 0
    assert rep["ratios"]["delayed_over_in_process"] > 0
    assert rep["delay_proxy"]["connections"] >= 1  # the delayed verifier went through it
    c = rep["codec"]
    assert c["to_drafter"]["encode_ms_per_round"] > 0 and c["from_drafter"]["decode_ms_per_round"]
    assert rep["machine"]["torch"] and rep["settings"]["prompts"] == 2
