"""End to end on the real target: client -> verifier <-> drafter over loopback gRPC, the drafter
and the verifier in separate OS processes (`coralline drafter` / `coralline verifier`), the
client SDK in this one. Token-identical to the in-process engine, greedy and sampled."""

import time

import pytest

from coralline.client import Client, InvalidArgument, NotFound
from coralline.engine import Engine
from coralline.sampling import SamplingParams

from .servers import ServerProcess

PROMPTS = [
    "Write a haiku about the sea.",
    "List three uses of a paperclip, one per line.",
    "请用三句话介绍一下长城。",
]


@pytest.fixture(scope="module")
def split():
    drafter = ServerProcess("drafter")
    try:
        verifier = ServerProcess("verifier", "--drafter-endpoint", drafter.address)
    except Exception:
        drafter.stop()
        raise
    client = Client(verifier.address, timeout=300)
    yield drafter, verifier, client
    client.close()
    codes = (verifier.stop(), drafter.stop())
    assert codes == (0, 0), (codes, verifier.stderr()[-2000:], drafter.stderr()[-2000:])


@pytest.fixture(scope="module")
def engine(smollm2):
    from coralline.draft.registry import make_drafter

    return Engine(smollm2, make_drafter("coral", smollm2))


def _info(address):
    import grpc

    from coralline.rpc.protos import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            return drafter_pb2_grpc.DrafterServiceStub(ch).Info(
                drafter_pb2.DrafterInfoRequest(), timeout=5
            )
        except grpc.RpcError:
            return verifier_pb2_grpc.VerifierServiceStub(ch).Info(
                verifier_pb2.VerifierInfoRequest(), timeout=5
            )


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=48),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_new_tokens=48),
    ],
    ids=["greedy", "T0.8-topp0.9"],
)
def test_split_pipeline_is_token_identical_to_the_engine(split, engine, smollm2, params):
    _, _, client = split
    for prompt in PROMPTS:
        ids = smollm2.encode(prompt)
        want = [t for c in engine.generate(ids, params) for t in c.token_ids]
        res = client.generate(
            prompt,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p if params.top_p < 1 else None,
            seed=params.seed,
        )
        assert res.token_ids == want, prompt
        assert res.text == smollm2.tokenizer.decode(want, skip_special_tokens=True)
        s = res.summary
        assert s.drafter == "coral" and s.fallback_rounds == 0
        assert s.acceptance_length > 1.0  # the remote drafts were accepted
        assert s.verifier == ("greedy" if params.greedy else "traversal")


@pytest.mark.slow
def test_a_conversation_as_messages_is_rendered_by_the_verifier(split, smollm2):
    """The verifier's own Generation API takes ChatMessages: the same ids as the chat template
    of the conversation sent as token ids; one user message is the text prompt's template."""
    from coralline.conversation import chat_ids

    _, _, client = split
    convo = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ]
    ids = chat_ids(smollm2.tokenizer, [(m["role"], m["content"]) for m in convo])
    got = client.generate(convo, max_new_tokens=8)
    assert got.summary.prompt_tokens == len(ids)
    assert got.token_ids == client.generate(token_ids=ids, max_new_tokens=8).token_ids
    one = client.generate([{"role": "user", "content": PROMPTS[0]}], max_new_tokens=8)
    assert one.token_ids == client.generate(PROMPTS[0], max_new_tokens=8).token_ids
    with pytest.raises(InvalidArgument, match="last message"):
        client.generate([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidArgument, match="not messages"):
        client.generate(convo, session_id=got.session_id, continue_session=True)


@pytest.mark.slow
def test_cancel_frees_the_session_on_both_services(split):
    drafter, verifier, client = split
    stream = client.stream(
        "Write a detailed 1000-word essay about the history of the Roman Empire.",
        max_new_tokens=400,
    )
    first = next(iter(stream))
    assert _info(verifier.address).active_sessions == 1
    assert _info(drafter.address).active_sessions == 1
    stream.close() if hasattr(stream, "close") else None
    del stream
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if _info(verifier.address).active_sessions == 0 == _info(drafter.address).active_sessions:
            break
        time.sleep(0.05)
    assert _info(verifier.address).active_sessions == 0
    assert _info(drafter.address).active_sessions == 0
    assert client.get_session(first.session_id).state == "cancelled"


@pytest.mark.slow
def test_bad_requests_leave_the_processes_serving(split):
    drafter, verifier, client = split
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        client.generate("   ")
    with pytest.raises(InvalidArgument, match="temperature"):
        client.generate("hi", temperature=-0.5)
    with pytest.raises(InvalidArgument, match=r"at most 4096 \(max_new_tokens\)"):
        client.generate("hi", max_new_tokens=100_000)
    with pytest.raises(InvalidArgument, match="context window"):  # 8192 for SmolLM2
        client.generate("hi " * 5000, max_new_tokens=4000)
    with pytest.raises(NotFound, match="unknown drafter"):
        client.generate("hi", drafter="coral-xl")
    with pytest.raises(NotFound):
        client.get_session("no-such-session")
    assert client.generate("Say hi.", max_new_tokens=4).summary.tokens == 4
    assert drafter.alive() and verifier.alive()


@pytest.mark.slow
def test_the_cli_generates_through_the_endpoint(split, engine, smollm2):
    import json
    import subprocess
    import sys

    _, verifier, _ = split
    out = subprocess.run(
        [sys.executable, "-m", "coralline.cli", "generate", PROMPTS[0], "--max-new-tokens", "24",
         "--endpoint", verifier.address, "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout)
    ids = smollm2.encode(PROMPTS[0])
    want = [t for c in engine.generate(ids, SamplingParams(max_new_tokens=24)) for t in c.token_ids]
    assert got["token_ids"] == want
    assert got["stats"]["drafter"] == "coral" and got["stats"]["tokens"] == 24
