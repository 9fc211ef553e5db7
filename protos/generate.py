"""Generate the Python gRPC code and .pyi stubs from protos/ into services/coralline/_proto.

    python protos/generate.py [OUT]     (OUT default: services/coralline/_proto; needs grpcio-tools)

The one generator: `make protos` and the container build (docker/Dockerfile) both run it. The
generated imports name the proto package (coralline.v1); they are pointed into
coralline._proto, as is the module each message class names, so pickle (Ray) finds the classes
by reference. Generated code is never committed.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # protos/


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    shutil.rmtree(out, ignore_errors=True)
    (out / "coralline" / "v1").mkdir(parents=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
    if protoc.main([*args, f"--grpc_python_out={out}", *protos]) != 0:
        raise SystemExit("protoc failed")
    files = sorted((out / "coralline" / "v1").glob("*.py*"))
    for f in files:
        text = f.read_text()
        text = re.sub(
            r"^from coralline\.v1 import",
            "from coralline._proto.coralline.v1 import",
            text,
            flags=re.M,
        )
        if f.name.endswith("_pb2.py"):
            text = re.sub(
                r"'coralline\.v1\.([a-z_]*_pb2)'", r"'coralline._proto.coralline.v1.\1'", text
            )
        f.write_text(text)
    for d in (out, out / "coralline", out / "coralline" / "v1"):
        (d / "__init__.py").touch()
    return files


if __name__ == "__main__":
    here = ROOT.parent
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "services" / "coralline" / "_proto"
    generate(target)
    print(f"generated {target}/coralline/v1 from protos/coralline/v1")
