"""Fuzzing the real drafter and verifier services (tiny model, in this process, loopback gRPC)
with reliability/fuzz.py: thousands of generated messages, every answer an expected status with
a message, the servers up and holding no session afterwards, and a verifier whose drafter sends
garbage Proposals still emitting its plain greedy output. The same fuzz runs on SmolLM2 through
the whole stack in `coralline reliability` (tests/reliability)."""

import random

import grpc
import pytest

from coralline.reliability import fuzz
from coralline.rpc.protos import drafter_pb2, drafter_pb2_grpc, generation_pb2, verifier_pb2
from coralline.rpc.server import Server, ServerOptions

from .conftest import VOCAB

MESSAGES = 2000


def _info(channel, method, request, reply):
    raw = channel.unary_unary(method)(request.SerializeToString(), timeout=10)
    return reply.FromString(raw)


def test_generators_are_seeded_and_cover_the_nasty_cases():
    cases = [fuzz.public_case(random.Random(f"x{i}"), VOCAB) for i in range(2000)]
    again = [fuzz.public_case(random.Random(f"x{i}"), VOCAB) for i in range(2000)]
    assert cases == again  # a failure replays from its seed
    parsed, unparsable = [], 0
    for method, data in cases:
        if not method.endswith("/Generate"):
            continue
        try:
            parsed.append(generation_pb2.GenerateRequest.FromString(data))
        except Exception:
            unparsable += 1
    assert unparsable > 20  # random bytes and invalid UTF-8
    temps = [r.sampling.temperature for r in parsed]
    assert any(t != t for t in temps) and any(t == float("inf") for t in temps)
    ids = [i for r in parsed for i in r.token_ids.ids]
    assert min(ids) < 0 and max(ids) >= VOCAB
    texts = [r.text for r in parsed]
    assert any("长城" in t for t in texts) and "" in texts and max(map(len, texts)) >= 2000
    assert any(r.max_new_tokens <= 0 for r in parsed if r.HasField("max_new_tokens"))
    kinds = {fuzz.bad_proposal(random.Random(i), 1, 3, VOCAB).proposal.tree.parents[:] == [-1, 2, 1]
             for i in range(200)}  # fmt: skip
    assert kinds == {True, False}  # cycles among the proposals, and others


def test_the_verifier_api_answers_every_generated_message(tiny_stack):
    ch = grpc.insecure_channel(tiny_stack.verifier.address)
    tally = fuzz.run_unary_api(
        "verifier",
        ch,
        lambda r: fuzz.verifier_case(r, VOCAB, tiny_stack.drafter.address),
        MESSAGES,
        timeout=60,
    )
    assert tally.messages == MESSAGES
    assert tally.bad_count == 0, tally.bad
    assert tally.codes["OK"] > 200 and tally.codes["INVALID_ARGUMENT"] > 200, tally.codes
    assert fuzz.verifier_sessions(ch) == 0
    ch.close()


def test_the_public_api_of_a_verifier_answers_every_generated_message(tiny_stack):
    ch = grpc.insecure_channel(tiny_stack.verifier.address)
    tally = fuzz.run_unary_api(
        "public", ch, lambda r: fuzz.public_case(r, VOCAB), MESSAGES, timeout=60
    )
    assert tally.messages == MESSAGES
    assert tally.bad_count == 0, tally.bad
    # the tiny target has no tokenizer: text prompts are refused, token ids run
    assert tally.codes["OK"] > 100 and tally.codes["INVALID_ARGUMENT"] > 500, tally.codes
    assert fuzz.verifier_sessions(ch) == 0
    ch.close()


def test_the_drafter_api_answers_every_generated_stream(tiny_stack, tiny_folders):
    ch = grpc.insecure_channel(tiny_stack.drafter.address)
    info = _info(ch, "/coralline.v1.DrafterService/Info", drafter_pb2.DrafterInfoRequest(),
                 drafter_pb2.DrafterInfo)  # fmt: skip
    from coralline import models

    d = models.load_token_weights(tiny_folders[0]).hidden_size
    tally = fuzz.run_drafter_api(ch, VOCAB, d, info.target_fingerprint, MESSAGES, timeout=60)
    assert tally.messages >= MESSAGES
    assert tally.bad_count == 0, tally.bad
    assert tally.codes["OK"] > 5 and tally.codes["INVALID_ARGUMENT"] > 50, tally.codes
    ch.close()


def test_garbage_proposals_never_change_a_greedy_output(tiny_stack):
    servicer = fuzz.FuzzDrafter(VOCAB, seed=3)

    async def start():
        server = Server(ServerOptions(), ["coralline.v1.DrafterService"])
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server.server)
        await server.start()
        return server

    server = tiny_stack.loop.call(start())
    ch = grpc.insecure_channel(tiny_stack.verifier.address)
    try:
        res = fuzz.run_proposals(ch, server.address, servicer, MESSAGES)
    finally:
        tiny_stack.loop.call(server.stop())
    assert res["proposals"] >= MESSAGES
    assert res["failed_sessions"] == 0, res["examples"]
    assert res["outputs_differing_from_plain"] == 0
    assert res["fallback_rounds"] > MESSAGES // 2  # most of them were refused
    info = _info(ch, "/coralline.v1.VerifierService/Info", verifier_pb2.VerifierInfoRequest(),
                 verifier_pb2.VerifierInfo)  # fmt: skip
    assert info.active_sessions == 0
    ch.close()


@pytest.mark.parametrize("garbage", [b"\xff\xfe\xfd", b"\x0a\x05\xff\xfe\xc0\xc1\xf5"])
def test_a_message_that_does_not_parse_is_invalid_argument(tiny_stack, garbage):
    """Random bytes, and a string field holding invalid UTF-8 (field 1, length 5)."""
    ch = grpc.insecure_channel(tiny_stack.verifier.address)
    call = ch.unary_stream("/coralline.v1.Generation/Generate")
    with pytest.raises(grpc.RpcError) as err:
        list(call(garbage, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in err.value.details()
    ch.close()
