"""The proto contract as data: every message's fields (name -> number, type, label, message
type) and every service's methods, from the generated descriptors. tests/rpc compares it with
the committed snapshot protos/coralline/v1/contract.json, so a reused, renumbered or retyped
field fails; `make proto-snapshot` rewrites the snapshot after a deliberate, compatible change.

Knows nothing about the services.
"""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor


def _fields(msg) -> dict:
    out = {}
    for f in msg.fields:
        out[f.name] = {
            "number": f.number,
            "type": f.type,
            "repeated": f.is_repeated
            if hasattr(f, "is_repeated")
            else (f.label == FieldDescriptor.LABEL_REPEATED),
            "message": f.message_type.full_name if f.message_type else "",
            "enum": f.enum_type.full_name if f.enum_type else "",
            "oneof": f.containing_oneof.name if f.containing_oneof else "",
        }
    return out


def contract() -> dict:
    from coralline.rpc import protos

    files = [
        protos.common_pb2,
        protos.drafter_pb2,
        protos.verifier_pb2,
        protos.generation_pb2,
    ]
    out: dict = {"messages": {}, "enums": {}, "services": {}}
    for module in files:
        fd = module.DESCRIPTOR
        for msg in fd.message_types_by_name.values():
            out["messages"][msg.full_name] = _fields(msg)
        for enum in fd.enum_types_by_name.values():
            out["enums"][enum.full_name] = {v.name: v.number for v in enum.values}
        for svc in fd.services_by_name.values():
            out["services"][svc.full_name] = {
                m.name: {
                    "input": m.input_type.full_name,
                    "output": m.output_type.full_name,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in svc.methods
            }
    return out


def snapshot_path() -> Path:
    return Path(__file__).resolve().parents[3] / "protos" / "coralline" / "v1" / "contract.json"


if __name__ == "__main__":  # make proto-snapshot
    snapshot_path().write_text(json.dumps(contract(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {snapshot_path()}")
