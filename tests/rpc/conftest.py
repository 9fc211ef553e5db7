"""Fixtures: the real drafter + verifier services over loopback gRPC on a background event loop,
on the tiny model folders of tests/conftest.py (`tiny_folders`)."""

import grpc
import pytest

from coralline.rpc.drafter_server import DrafterServiceConfig, start_drafter
from coralline.rpc.protos import (
    drafter_pb2_grpc,
    generation_pb2_grpc,
    verifier_pb2_grpc,
)
from coralline.rpc.server import ServerOptions
from coralline.rpc.verifier_server import VerifierServiceConfig, start_verifier

from .servers import LoopThread

VOCAB = 8


class Stack:
    def __init__(self, loop, drafter, dservice, verifier, core):
        self.loop, self.drafter, self.dservice = loop, drafter, dservice
        self.verifier, self.core = verifier, core
        self.channel = grpc.insecure_channel(verifier.address)
        self.gen = generation_pb2_grpc.GenerationStub(self.channel)
        self.ver = verifier_pb2_grpc.VerifierServiceStub(self.channel)
        self.dchannel = grpc.insecure_channel(drafter.address)
        self.dr = drafter_pb2_grpc.DrafterServiceStub(self.dchannel)


@pytest.fixture(scope="session")
def tiny_stack(tiny_folders):
    """The real services on the tiny model: drafter (CORAL head) + verifier (1 MiB messages,
    short drafter deadlines so the hang tests stay short)."""
    target, head = tiny_folders
    loop = LoopThread()
    drafter, dservice = loop.call(
        start_drafter(DrafterServiceConfig(model=target, checkpoint=head, idle_timeout_s=30.0))
    )
    verifier, core = loop.call(
        start_verifier(
            VerifierServiceConfig(
                model=target,
                drafter_endpoint=drafter.address,
                max_sessions=8,
                round_timeout_s=0.5,
                open_timeout_s=1.0,
                max_reconnects=1,
                max_tree_nodes=64,
                measured_switch=False,  # rounds speculate whatever the load: the mechanics are
                # tested here (test_services_tiny.py sets a switch where it tests one)
                server=ServerOptions(max_message_bytes=1 << 20),
            )
        )
    )
    stack = Stack(loop, drafter, dservice, verifier, core)
    yield stack
    stack.channel.close()
    stack.dchannel.close()
    loop.call(verifier.stop())
    loop.call(drafter.stop())
    loop.stop()
