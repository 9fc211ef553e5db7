"""The proto is the contract: field numbers and types never change silently."""

import json

from coralline.rpc.contract import contract, snapshot_path
from coralline.rpc.protos import common_pb2, drafter_pb2, generation_pb2


def test_descriptors_match_the_committed_snapshot():
    snap = json.loads(snapshot_path().read_text())
    now = contract()
    problems = []
    for name, fields in snap["messages"].items():
        for field, spec in fields.items():
            got = now["messages"].get(name, {}).get(field)
            if got != spec:
                problems.append(f"{name}.{field}: snapshot {spec}, now {got}")
        numbers = {}
        for field, spec in now["messages"].get(name, {}).items():
            numbers.setdefault(spec["number"], []).append(field)
        for number, names in numbers.items():
            old = [f for f, s in fields.items() if s["number"] == number]
            if old and old != names:
                problems.append(f"{name}: field number {number} reused ({old} -> {names})")
    for kind in ("enums", "services"):
        for name, spec in snap[kind].items():
            if now[kind].get(name) != spec:
                problems.append(f"{kind} {name}: snapshot {spec}, now {now[kind].get(name)}")
    assert not problems, "incompatible proto change:\n" + "\n".join(problems)
    assert now == snap, (
        "the protos gained fields, messages or services: if the change is compatible, run "
        "`make proto-snapshot` and commit protos/coralline/v1/contract.json"
    )


def test_a_renumbered_field_is_caught():
    snap = contract()
    snap["messages"]["coralline.v1.TokenTree"]["parents"]["number"] = 7
    assert snap != contract()


def test_conventions():
    """Enums start at *_UNSPECIFIED = 0; durations are integer *_ns fields."""
    for module in (common_pb2, drafter_pb2, generation_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.full_name
    for msgs in contract()["messages"].values():
        for field, spec in msgs.items():
            if field.endswith(("_ms", "_s", "_seconds")):
                raise AssertionError(f"{field}: times go in *_ns")
            if field.endswith("_ns"):
                assert spec["type"] in (3, 4), field  # int64 / uint64
