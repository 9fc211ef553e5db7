"""Security of the gRPC links (rpc/security.py, rpc/certs.py), on real servers over loopback:
mutual TLS from `coralline certs` files, bearer tokens on the public services only, tokens
loaded from a file and the environment, never logged."""

import logging
import os
import stat
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coralline.client import Client
from coralline.client.errors import Unauthenticated
from coralline.rpc.certs import make_dev_ca
from coralline.rpc.protos import generation_pb2, verifier_pb2
from coralline.rpc.security import TOKENS_ENV, TlsConfig, Tokens, load_tokens, sync_channel
from coralline.rpc.server import ServerOptions
from coralline.rpc.verifier_server import VerifierServiceConfig, start_verifier

from .servers import LoopThread

TOKENS = ("a" * 16 + "-first-token", "b" * 16 + "-second-token")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_dev_ca(folder)
    other = tmp_path_factory.mktemp("other-ca")
    make_dev_ca(other)  # a second CA: its certificates must be refused
    return folder, other


@pytest.fixture(scope="module")
def secured(tiny_folders, certs):
    """A real verifier (plain decoding, tiny model) on a mutual-TLS port with two tokens."""
    folder, _ = certs
    loop = LoopThread()
    server, _core = loop.call(
        start_verifier(
            VerifierServiceConfig(
                model=tiny_folders[0],
                server=ServerOptions(
                    tls=TlsConfig.from_dir(str(folder), "server"), api_tokens=frozenset(TOKENS)
                ),
            )
        )
    )
    yield server.address, folder
    loop.call(server.stop())
    loop.stop()


def _client_files(folder, name="client"):
    return (folder / f"{name}.pem").read_bytes(), (folder / f"{name}-key.pem").read_bytes()


def _generate(address, folder, token=None, cert_folder=None, name="client"):
    ca = (folder / "ca.pem").read_bytes()
    cert = _client_files(cert_folder or folder, name)
    with Client(address, token=token, root_certificates=ca, client_cert=cert, retries=0) as c:
        return c.generate(token_ids=[1, 2, 3], max_new_tokens=4)


def test_dev_ca_files(certs):
    from cryptography import x509

    folder, _ = certs
    for name in ("ca-key", "server-key", "client-key"):
        assert stat.S_IMODE(os.stat(folder / f"{name}.pem").st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def test_a_token_and_a_client_certificate_get_through(secured):
    address, folder = secured
    for token in TOKENS:  # either token
        assert len(_generate(address, folder, token).token_ids) == 4


@pytest.mark.parametrize(
    ("token", "match"),
    [(None, "no bearer token"), ("c" * 20, "not accepted"), (TOKENS[0][:-1], "not accepted")],
)
def test_the_public_api_refuses_a_missing_or_wrong_token(secured, token, match):
    address, folder = secured
    with pytest.raises(Unauthenticated, match=match):
        _generate(address, folder, token)


def test_the_token_is_checked_as_a_bearer_credential():
    t = Tokens(TOKENS)
    assert t.accepts(f"Bearer {TOKENS[0]}") and t.accepts(f"bearer {TOKENS[1]}")
    assert t.accepts(f"Bearer {TOKENS[1]}".encode())
    for bad in (None, "", TOKENS[0], f"Basic {TOKENS[0]}", f"Bearer {TOKENS[0]}x", "Bearer ",
                b"Bearer \xff"):  # fmt: skip
        assert not t.accepts(bad), bad
    assert TOKENS[0] not in repr(t)


def test_the_internal_service_and_health_need_no_token_but_a_certificate(secured, certs):
    """VerifierService (the router's link) and health: mutual TLS only. A client without a
    certificate, with one from another CA, or without TLS at all gets nowhere."""
    address, folder = secured
    tls = TlsConfig.from_dir(str(folder), "client")
    with sync_channel(address, tls) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        info = ch.unary_unary(
            "/coralline.v1.VerifierService/Info",
            request_serializer=verifier_pb2.VerifierInfoRequest.SerializeToString,
            response_deserializer=verifier_pb2.VerifierInfo.FromString,
        )(verifier_pb2.VerifierInfoRequest(), timeout=10)
        assert info.capacity > 0
    _, other = certs
    ca = (folder / "ca.pem").read_bytes()
    foreign = TlsConfig(
        str(other / "client.pem"), str(other / "client-key.pem"), str(folder / "ca.pem")
    )
    attempts = [
        grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)),  # no client cert
        sync_channel(address, foreign),  # a client certificate from another CA
        grpc.insecure_channel(address),  # no TLS
    ]
    for ch in attempts:
        with ch:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_server_certificate_from_another_ca_is_refused(secured, certs):
    address, _ = secured
    _, other = certs
    tls = TlsConfig(str(other / "client.pem"), str(other / "client-key.pem"), str(other / "ca.pem"))
    with sync_channel(address, tls) as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokens_are_never_logged(secured, caplog):
    address, folder = secured
    caplog.set_level(logging.DEBUG)
    _generate(address, folder, TOKENS[0])
    with pytest.raises(Unauthenticated):
        _generate(address, folder, TOKENS[1] + "x")
    assert caplog.records  # the verifier logged the sessions
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKENS[0] not in text and TOKENS[1] not in text


def test_load_tokens_from_a_file_and_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "tokens"
    f.write_text(f"# the ops team\n{TOKENS[0]}\n\n  {TOKENS[1]}  \n")
    monkeypatch.setenv(TOKENS_ENV, f"{'e' * 20}, {'f' * 20}")
    assert load_tokens(str(f)) == {*TOKENS, "e" * 20, "f" * 20}
    monkeypatch.delenv(TOKENS_ENV)
    assert load_tokens(None) == frozenset()  # auth off
    f.write_text("short\n")
    with pytest.raises(ValueError, match="line 1 is shorter than 16"):
        load_tokens(str(f))
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        load_tokens(str(f))
    with pytest.raises(ValueError, match="cannot read the token file"):
        load_tokens(str(tmp_path / "missing"))
    monkeypatch.setenv(TOKENS_ENV, "x" * 20 + "\x07")
    with pytest.raises(ValueError, match="non-printable"):
        load_tokens(None)


def test_bad_tls_files_are_named(tmp_path, certs):
    folder, _ = certs
    with pytest.raises(ValueError, match=r"cannot read the certificate .*missing\.pem"):
        TlsConfig(str(tmp_path / "missing.pem"), str(folder / "server-key.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"junk\.pem' is not PEM"):
        TlsConfig(str(folder / "server.pem"), str(tmp_path / "junk.pem"))


def test_coralline_certs_and_health_over_mutual_tls(secured, tmp_path):
    address, folder = secured
    out = subprocess.run(
        [sys.executable, "-m", "coralline.cli", "certs", str(tmp_path / "c"), "--host", "db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c" / "server.pem").exists() and "--tls-dir" in out.stdout

    def health(*extra):
        return subprocess.run(
            [sys.executable, "-m", "coralline.cli", "health", "--endpoint", address, *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = health("--tls-dir", str(folder))
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    assert health().returncode == 1  # no TLS: refused


def test_generation_request_types_still_validate(secured):
    """A token-bearing request with a bad field still gets its own status (auth first, then
    the request's checks)."""
    address, folder = secured
    ca = (folder / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(ca, *reversed(_client_files(folder)))
    with grpc.secure_channel(address, creds) as ch:
        call = ch.unary_stream(
            "/coralline.v1.Generation/Generate",
            request_serializer=generation_pb2.GenerateRequest.SerializeToString,
            response_deserializer=generation_pb2.GenerateResponse.FromString,
        )
        req = generation_pb2.GenerateRequest(max_new_tokens=0)
        req.token_ids.ids[:] = [1, 2]
        with pytest.raises(grpc.RpcError) as err:
            list(call(req, metadata=[("authorization", f"Bearer {TOKENS[0]}")], timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            list(call(req, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
