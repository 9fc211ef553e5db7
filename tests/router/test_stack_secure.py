"""`coralline serve --tls-dir certs --api-tokens-file FILE` end to end on SmolLM2: the public
port is TLS and asks for a bearer token, every internal link (router -> verifier, router ->
drafter, verifier -> drafter) is mutual TLS, and the output is the target's own greedy output."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coralline.client import Client
from coralline.client.errors import Unauthenticated
from coralline.rpc.certs import make_dev_ca

TOKEN = "reliability-" + "t" * 24


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory):
    from coralline.router.stack import Stack, StackConfig

    certs = tmp_path_factory.mktemp("certs")
    make_dev_ca(certs)
    stack = Stack(
        StackConfig(
            port=0,
            http_port=0,
            drafters=1,
            verifiers=1,
            log_dir=str(tmp_path_factory.mktemp("secure-logs")),
            telemetry=False,
            tls_dir=str(certs),
            api_tokens=frozenset({TOKEN}),
        )
    )
    stack.start()
    yield stack, certs
    stack.stop()


@pytest.mark.slow
def test_a_secured_stack_serves_only_authenticated_tls_clients(secure_stack, smollm2):
    from coralline.engine import Engine, generate_ids
    from coralline.sampling import SamplingParams

    stack, certs = secure_stack
    ca = (certs / "ca.pem").read_bytes()
    prompt = "Write a haiku about the sea."
    want = generate_ids(Engine(smollm2), smollm2.encode(prompt), SamplingParams(max_new_tokens=24))
    with Client(stack.address, token=TOKEN, root_certificates=ca, retries=0) as c:
        r = c.generate(prompt, max_new_tokens=24)
    assert list(r.token_ids) == want
    assert r.summary.drafter == "coral" and r.summary.fallback_rounds == 0  # the mTLS link held
    for token in (None, TOKEN + "x"):
        c = Client(stack.address, token=token, root_certificates=ca, retries=0)
        with c, pytest.raises(Unauthenticated):
            c.generate(prompt, max_new_tokens=4)
    # a plaintext client gets nowhere, on the public port or a worker's
    for address in (stack.address, stack.verifiers[0].address, stack.drafters[0].address):
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a TLS client without a client certificate reaches the public port, not a worker
    with grpc.secure_channel(stack.address, grpc.ssl_channel_credentials(ca)) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    ch = grpc.secure_channel(stack.verifiers[0].address, grpc.ssl_channel_credentials(ca))
    with ch, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert any("TLS on the public port" in line for line in stack.describe())


@pytest.mark.slow
def test_the_http_api_is_https_with_the_same_tokens(secure_stack, smollm2):
    """The OpenAI-compatible API of the same stack: HTTPS with the service certificate, the
    same bearer tokens on /v1/*, /health open; the greedy text equals the gRPC SDK's."""
    import httpx2
    import openai

    stack, certs = secure_stack
    ca = str(certs / "ca.pem")
    assert stack.http_url.startswith("https://127.0.0.1:")
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    with Client(stack.address, token=TOKEN, root_certificates=open(ca, "rb").read()) as c:
        want = c.generate(messages, max_new_tokens=16).text
    http = httpx2.Client(verify=ca)
    client = openai.OpenAI(base_url=stack.http_url, api_key=TOKEN, http_client=http)
    r = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, temperature=0, max_tokens=16
    )
    assert r.choices[0].message.content == want
    for key in ("wrong-" + TOKEN, ""):
        bad = openai.OpenAI(base_url=stack.http_url, api_key=key or "x", http_client=http)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body["code"] == "invalid_api_key"
    assert http.get(stack.http_url.removesuffix("/v1") + "/health").status_code == 200
    with pytest.raises(httpx2.ConnectError):  # the certificate is checked: no CA, no talk
        httpx2.get(stack.http_url + "/models", headers={"authorization": f"Bearer {TOKEN}"})
