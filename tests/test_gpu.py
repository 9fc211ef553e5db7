"""The CUDA paths against the CPU reference (run wherever a GPU exists; `gpu` marker)."""

import pytest
import torch

from coralline.draft.base import DraftInput
from coralline.engine import Engine
from coralline.sampling import SamplingParams
from coralline.target import TargetConfig, TargetRunner
from coralline.tree import TokenTree

pytestmark = pytest.mark.gpu


def test_target_tree_forward_on_cuda_matches_cpu(smollm2):
    gpu = TargetRunner.load(TargetConfig(device="cuda"))
    ids = smollm2.encode("Write a haiku about the sea.")
    tree = TokenTree.from_parents([ids[-1], 504, 1092, 314], [-1, 0, 0, 1])
    outs = []
    for runner in (smollm2.fork(), gpu):
        feats = runner.prefill(ids)
        out = runner.tree_forward(tree)
        runner.commit([0, 1])
        outs.append((feats, out))
    assert outs[1][1].features.is_cuda and outs[1][0].is_cuda  # features stay on the device
    assert torch.allclose(outs[0][1].logits, outs[1][1].logits, atol=1e-3, rtol=1e-3)


def test_coral_drafter_and_engine_on_cuda():
    from coralline.draft.registry import make_drafter

    gpu = TargetRunner.load(TargetConfig(device="cuda"))
    drafter = make_drafter("coral", gpu)
    assert drafter.device.type == "cuda"
    ids = gpu.encode("List three colours.")
    prop = drafter.propose(DraftInput(ids, gpu.prefill(ids)), SamplingParams())
    assert prop.tree.num_nodes >= 1
    out = [t for c in Engine(gpu, drafter).generate(ids, SamplingParams(max_new_tokens=16))
           for t in c.token_ids]  # fmt: skip
    plain = [t for c in Engine(gpu.fork()).generate(ids, SamplingParams(max_new_tokens=16))
             for t in c.token_ids]  # fmt: skip
    assert out == plain  # lossless greedy on the GPU too


def test_drafter_service_weights_on_cuda():
    from coralline.models import load_token_weights

    w = load_token_weights("smollm2-135m-instruct", torch.float32, "cuda")
    cpu = load_token_weights("smollm2-135m-instruct")
    assert w.embed.is_cuda and w.fingerprint == cpu.fingerprint


def test_services_on_cuda_equal_the_cpu_engine(smollm2):
    """`coralline drafter --device cuda` + `coralline verifier --device cuda`: token-identical
    to the in-process engine with the same drafter on the same device (fp32)."""
    from coralline.client import Client
    from coralline.draft.registry import make_drafter

    from .rpc.servers import ServerProcess

    drafter = ServerProcess("drafter", "--device", "cuda")
    verifier = ServerProcess("verifier", "--device", "cuda", "--drafter-endpoint", drafter.address)
    try:
        prompt = "Write a haiku about the sea."
        ids = smollm2.encode(prompt)
        gpu = TargetRunner.load(TargetConfig(device="cuda"))
        engine = Engine(gpu, make_drafter("coral", gpu))
        want = [t for c in engine.generate(ids, SamplingParams(max_new_tokens=32))
                for t in c.token_ids]  # fmt: skip
        with Client(verifier.address) as client:
            res = client.generate(prompt, max_new_tokens=32)
        assert res.token_ids == want and res.summary.fallback_rounds == 0
    finally:
        verifier.stop()
        drafter.stop()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_forward_on_cuda_matches_the_reference_runner(dtype):
    """The ragged batched forward over a CUDA KV pool: each of 4 sessions' tree rows equal the
    reference runner's (DynamicKV) on the same device and dtype; greedy generations of 4
    concurrent sessions equal their one-session runs in fp32."""
    import threading

    from coralline.batching.scheduler import BatchConfig, pooled
    from coralline.engine import generate_ids

    ref = TargetRunner.load(TargetConfig(device="cuda", dtype=dtype))
    root = pooled(ref, BatchConfig(slots=8, prefill_chunk=16))
    prompts = [ref.encode(p) for p in ("Write a haiku.", "Name three rivers.", "Count to five.",
                                       "Say hello in French.")]  # fmt: skip
    tol = 1e-3 if dtype == "float32" else 5e-2
    for ids in prompts:
        a, b = ref.fork(), root.fork()
        a.prefill(ids)
        b.prefill(ids)
        tree = TokenTree.from_parents([ids[-1], 504, 1092, 314], [-1, 0, 0, 1])
        oa, ob = a.tree_forward(tree), b.tree_forward(tree)
        assert torch.allclose(oa.logits, ob.logits, atol=tol, rtol=tol)
        b.reset()
    if dtype != "float32":
        return
    params = SamplingParams(max_new_tokens=24)
    want = [generate_ids(Engine(ref.fork()), ids, params) for ids in prompts]
    got: list = [None] * len(prompts)

    def run(k):
        r = root.fork()
        got[k] = generate_ids(Engine(r), prompts[k], params)
        r.reset()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == want
    assert max(root.kv.scheduler.stats.sessions_hist) >= 2
