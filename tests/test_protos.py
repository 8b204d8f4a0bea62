from tandem import protogen


def test_checked_in_grpc_stubs_match_the_proto() -> None:
    assert protogen.main(["--check"]) == 0
