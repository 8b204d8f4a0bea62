from tandem import protogen


def test_checked_in_grpc_stubs_match_the_proto() -> None:
    assert protogen.main(["--check"]) == 0


def test_dependency_floors_are_what_the_generated_stubs_check_at_import() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pyproject = (root / "pyproject.toml").read_text()
    pb2 = (root / "proto" / "tandem_pb2.py").read_text()
    grpc_stub = (root / "proto" / "tandem_pb2_grpc.py").read_text()
    major, minor, patch = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb2).groups()
    assert f'"protobuf>={major}.{minor}.{patch},<{int(major) + 1}"' in pyproject
    generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub).group(1)
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert f'"{name}>={generated}"' in pyproject, name
