"""The Sans-I/O rules behind gateway access: token specs, listening, client addresses."""

from __future__ import annotations

import pytest

from gateway import access
from gateway import core as C
from schemas import protocol as P


def test_token_spec_parses_name_secret_cap_and_npcs():
    t = C.Token.parse("game:s3cret:500:guard|merchant")
    assert (t.name, t.secret, t.max_sessions) == ("game", "s3cret", 500)
    assert t.allows("guard") and not t.allows("wizard")
    assert C.Token.parse("qa:x").npcs is None and C.Token.parse("qa:x::*").allows("wizard")
    for bad in ("nosecret", "bad name:x", "a::1", "a:b:c:d:e"):
        with pytest.raises(ValueError) as err:
            C.Token.parse(bad)
        assert "b:c" not in str(err.value)  # the message never quotes a secret


def test_legacy_auth_token_is_the_default_token():
    tokens = C.parse_tokens(["game:s3cret"], legacy="old")
    assert set(tokens) == {"game", "default"} and tokens["default"].secret == "old"


def test_hello_lists_only_the_npcs_a_token_may_open():
    limits = C.Limits(tokens=C.parse_tokens(["game:s:0:guard"]))
    core = C.ConnectionCore(limits, {"guard": "v1", "wizard": "v2"})
    [welcome] = core.receive_text(P.encode(P.Hello(token_name="game", token="s")), 0)
    assert welcome.message.npcs == ["guard"] and welcome.message.token_name == "game"
    [err] = core.receive_text(P.encode(P.OpenSession(session="w", npc="wizard")), 0)
    assert err.message.code == P.ErrorCode.NPC_NOT_ALLOWED


@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                     ("0.0.0.0", False), ("", False), ("10.0.0.5", False),
                                     ("npc.example.com", False)])
def test_only_loopback_listens_without_auth(host, ok):
    if ok:
        access.check_listen(host, authenticated=False, insecure=False)
    else:
        with pytest.raises(ValueError, match="insecure_no_auth"):
            access.check_listen(host, authenticated=False, insecure=False)
    access.check_listen(host, authenticated=True, insecure=False)
    access.check_listen(host, authenticated=False, insecure=True)


def test_client_address_believes_only_a_configured_header_from_trusted_peers():
    h = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
    assert access.client_address("10.0.0.2", h, "", []) == "10.0.0.2"
    assert access.client_address("10.0.0.2", h, "X-Forwarded-For", []) == "203.0.113.9"
    assert access.client_address("10.0.0.2", h, "X-Forwarded-For", ["10.0.0.1"]) == "10.0.0.2"
    assert access.client_address("10.0.0.1", {}, "X-Forwarded-For", ["10.0.0.1"]) == "10.0.0.1"


def test_secrets_are_long_random_and_checked_by_hash():
    secret, stored = access.new_secret()
    assert len(secret) >= 32 and secret not in stored
    assert access.secret_matches(secret, stored)
    assert not access.secret_matches(secret + "x", stored)
    assert not access.secret_matches(secret, "")
