"""Generate the Python gRPC stubs in proto/ from proto/tandem.proto.

Run ``python -m tandem.protogen`` after changing the .proto; the tests fail
when the checked-in stubs are stale. ``--check`` only compares.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"
STUBS = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Write the stubs for proto/tandem.proto into out_dir."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src" / "tandem" / "proto"
        dst = Path(tmp) / "out"
        src.mkdir(parents=True)
        dst.mkdir()
        shutil.copy(PROTO_DIR / "tandem.proto", src / "tandem.proto")
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{Path(tmp) / 'src'}",
            f"--python_out={dst}", f"--pyi_out={dst}", f"--grpc_python_out={dst}",
            str(src / "tandem.proto"),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        for name in STUBS:
            shutil.copy(dst / "tandem" / "proto" / name, out_dir / name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the checked-in stubs are stale")
    args = ap.parse_args(argv)
    if not args.check:
        generate(PROTO_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in STUBS if (Path(tmp) / n).read_bytes() != (PROTO_DIR / n).read_bytes()]
    if stale:
        print(f"stale gRPC stubs: {', '.join(stale)}; run: python -m tandem.protogen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
