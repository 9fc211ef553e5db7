"""A real Prometheus server for tests: 127.0.0.1 only, on a free port, its TSDB and log in the
test's folder, scraping the given targets every second (`make servers` installs the Debian
package when it is missing).

Measured with Prometheus 2.42 and a 1 s scrape interval: ready in ~0.2 s, first scrape ~5 s
after the start (service discovery hands targets over every 5 s), so a `rate(x[5s])` answers
~7 s after the start.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from coralline.rpc.process import stop_process

LOG_TAIL = 3000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusQueryError(RuntimeError):
    """Prometheus answered a query with status != success (its errorType and error text)."""


class OwnPrometheus:
    """A real prometheus server on a free loopback port, scraping the given targets every 1 s.

    static_targets: job (= service) name -> ["127.0.0.1:PORT", ...]; each such target carries
    the labels job=<name> and service=<name>. http_sd_url: a URL serving Prometheus HTTP service
    discovery (a JSON list of {"targets": [...], "labels": {...}}), scraped as job "http-sd".
    """

    def __init__(
        self,
        workdir: Path,
        static_targets: dict[str, list[str]] | None = None,
        http_sd_url: str | None = None,
        scrape_interval: str = "1s",
    ) -> None:
        binary = shutil.which("prometheus") or (
            "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
        )
        if binary is None:
            pytest.fail(
                "prometheus is not installed: run `make servers` (installs the Debian "
                "prometheus package)"
            )
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.static_targets = dict(static_targets or {})
        self.http_sd_url = http_sd_url
        self.scrape_interval = scrape_interval
        self.config_path = self.workdir / "prometheus.yml"
        self.log = self.workdir / "prometheus.log"
        self.tsdb = self.workdir / "tsdb"
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen | None = None

    # -- configuration -----------------------------------------------------------------
    def config(self) -> dict:
        """The scrape configuration written for the server (JSON is YAML)."""
        jobs: list[dict] = [
            {
                "job_name": name,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets), "labels": {"service": name}}],
            }
            for name, targets in self.static_targets.items()
        ]
        if self.http_sd_url:
            jobs.append(
                {
                    "job_name": "http-sd",
                    "metrics_path": "/metrics",
                    "http_sd_configs": [{"url": self.http_sd_url, "refresh_interval": "1s"}],
                }
            )
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": jobs,
        }

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until /-/ready answers 200 (a few tries on a port race)."""
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        for attempt in range(3):
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            argv = [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.tsdb}",
                "--storage.tsdb.retention.time=1h",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=info",
            ]
            with self.log.open("ab") as log:
                log.write(f"--- start {attempt}: {' '.join(argv)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._ready():
                    return
                time.sleep(0.05)
            exited = self.proc.poll() is not None
            self.stop()
            if not (exited and "address already in use" in self._log_tail()):
                break
        raise RuntimeError(f"prometheus did not become ready at {self.url}:\n{self._log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10.0)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return "(no log)"

    # -- HTTP API ----------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, str] | None = None) -> dict:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:  # 400/422/503 carry a JSON error body
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise PrometheusQueryError(
                    f"GET {path} {params}: HTTP {e.code}: {raw[:500]!r}"
                ) from None
        except (urllib.error.URLError, OSError) as e:
            raise PrometheusQueryError(
                f"GET {path} {params}: {e}\nprometheus log:\n{self._log_tail()}"
            ) from None
        if body.get("status") != "success":
            raise PrometheusQueryError(
                f"{params or path}: {body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query (/api/v1/query): data.result (a list for vector answers; a scalar
        or string answer comes back as one {"metric": {}, "value": [t, v]} entry)."""
        data = self._get("/api/v1/query", {"query": promql})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, promql: str, timeout: float = 30.0, finite: bool = False) -> list[dict]:
        """Poll `promql` until it returns a non-empty result (with `finite`: one whose values
        are not all NaN / Inf) and return it; an AssertionError names the query on timeout."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while True:
            result = self.query(promql)
            if result and (not finite or any(has_finite_value(r) for r in result)):
                return result
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        raise AssertionError(
            f"prometheus query {promql!r} returned {'no finite value' if result else 'nothing'}"
            f" within {timeout:.0f} s (last result: {result[:3]})\n"
            f"targets: {self.target_summary()}\nprometheus log tail:\n{self._log_tail()}"
        )

    def targets(self) -> list[dict]:
        """/api/v1/targets: the active targets (labels, health, lastError, scrapeUrl, ...)."""
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def target_summary(self) -> str:
        """One line: job/instance=health (lastError) of each active target."""
        try:
            return ", ".join(
                f"{t['labels'].get('job')}/{t['labels'].get('instance')}={t['health']}"
                + (f" ({t['lastError']})" if t.get("lastError") else "")
                for t in self.targets()
            )
        except PrometheusQueryError as e:
            return f"(unavailable: {e})"


def has_finite_value(sample: dict) -> bool:
    """Whether an instant-query sample (or a range-query series) holds a finite value."""
    values = [sample["value"]] if "value" in sample else sample.get("values", [])
    return any(math.isfinite(float(v[1])) for v in values)


@contextlib.contextmanager
def own_prometheus(workdir: Path, **kw) -> Iterator[OwnPrometheus]:
    """Start an OwnPrometheus (see its arguments), yield it, stop it."""
    server = OwnPrometheus(workdir, **kw)
    try:
        server.start()
        yield server
    finally:
        server.stop()
