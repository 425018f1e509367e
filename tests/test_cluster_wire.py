"""The cluster link protocol, sans-IO: framing and the mutual handshake, without sockets.

Two :class:`Handshake` objects are wired together by hand, as wsproto's tests wire two
connections, so every refusal can be provoked exactly.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from chatd.cluster import FrameDecoder, Handshake, LinkError, encode_frame, link_key

KEY = link_key(b"the cluster secret")


def test_frames_survive_any_split() -> None:
    frames = [{"t": "route", "n": i, "body": "x" * i} for i in range(20)]
    data = b"".join(encode_frame(frame) for frame in frames)
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(data[:cut]) + decoder.feed(data[cut:]) == frames


def test_a_frame_over_the_limit_is_refused_by_its_length_alone() -> None:
    decoder = FrameDecoder(max_frame=100)
    assert decoder.feed(encode_frame({"t": "ok", "x": "y" * 80})) == [
        {"t": "ok", "x": "y" * 80}]
    with pytest.raises(LinkError, match="exceeds 100"):
        decoder.feed((101).to_bytes(4, "big"))  # no body needed to refuse it


@pytest.mark.parametrize("body", [
    cbor2.dumps([1, 2]),  # not a map
    cbor2.dumps({"x": 1}),  # no type
    cbor2.dumps({"t": 7}),  # type not text
    b"\xff\x00",  # not CBOR
    cbor2.dumps({"t": "a"}) + b"\x00",  # trailing bytes
    cbor2.dumps(cbor2.CBORTag(55799, {"t": "a"})),  # tagged
    b"\xbf\x61t\x61a\xff",  # indefinite map
])
def test_malformed_frames_are_refused(body: bytes) -> None:
    with pytest.raises(LinkError):
        FrameDecoder().feed(len(body).to_bytes(4, "big") + body)


def pair(dialer_key: bytes = KEY, acceptor_key: bytes = KEY, *, expect: str = "n2",
         known: tuple[str, ...] = ("n1", "n3")) -> tuple[Handshake, Handshake]:
    dialer = Handshake(dialer_key, "n1", peer=expect)
    acceptor = Handshake(acceptor_key, "n2", known=lambda name: name in known)
    return dialer, acceptor


def wire(frame: dict[str, Any]) -> dict[str, Any]:
    """What the other side decodes: the frame through the real framing."""
    (decoded,) = FrameDecoder().feed(encode_frame(frame))
    return decoded


def test_nodes_holding_the_key_link_and_learn_each_other() -> None:
    dialer, acceptor = pair()
    (challenge,) = acceptor.receive(wire(dialer.start()))
    (auth,) = dialer.receive(wire(challenge))
    assert dialer.done and not acceptor.done  # the acceptor still waits for the auth
    assert acceptor.receive(wire(auth)) == []
    assert acceptor.done
    assert (dialer.peer, acceptor.peer) == ("n2", "n1")


def test_frames_that_follow_the_handshake_in_one_read_are_kept_for_the_link() -> None:
    dialer, acceptor = pair()
    (challenge,) = acceptor.receive(wire(dialer.start()))
    (auth,) = dialer.receive(wire(challenge))
    # The dialer's first link frames leave in the same segment as its auth frame.
    data = b"".join(encode_frame(f) for f in (auth, {"t": "sync", "sessions": []},
                                               {"t": "beat"}))
    replies, after = acceptor.receive_all(FrameDecoder().feed(data))
    assert acceptor.done and replies == []
    assert after == [{"t": "sync", "sessions": []}, {"t": "beat"}]


def test_a_dialer_without_the_key_is_refused_by_the_acceptor() -> None:
    dialer, acceptor = pair(dialer_key=link_key(b"another secret"))
    (challenge,) = acceptor.receive(wire(dialer.start()))
    with pytest.raises(LinkError, match="cluster's key"):  # it cannot check the acceptor
        dialer.receive(wire(challenge))
    forged = {"t": "auth", "proof": b"\x00" * 32}
    with pytest.raises(LinkError, match="cluster's key"):
        acceptor.receive(forged)
    assert not acceptor.done


def test_an_acceptor_without_the_key_is_refused_by_the_dialer() -> None:
    dialer, acceptor = pair(acceptor_key=link_key(b"another secret"))
    (challenge,) = acceptor.receive(wire(dialer.start()))
    with pytest.raises(LinkError, match="cluster's key"):
        dialer.receive(wire(challenge))
    assert not dialer.done


def test_a_recorded_auth_does_not_open_another_link() -> None:
    dialer, acceptor = pair()
    (challenge,) = acceptor.receive(dialer.start())
    (recorded,) = dialer.receive(challenge)
    # The same dialer hello replayed to a fresh acceptor gets a fresh nonce...
    _, replay_target = pair()
    replay_target.receive(dialer.start())
    # ...so the recorded proof, made for the first acceptor's nonce, fails.
    with pytest.raises(LinkError, match="cluster's key"):
        replay_target.receive(recorded)


def test_the_dialer_refuses_a_node_it_did_not_mean_to_reach() -> None:
    dialer, acceptor = pair(expect="n9")
    (challenge,) = acceptor.receive(dialer.start())
    with pytest.raises(LinkError, match="expected 'n9'"):
        dialer.receive(challenge)


def test_the_acceptor_refuses_unknown_nodes_itself_and_other_versions() -> None:
    dialer, acceptor = pair(known=("n3",))
    with pytest.raises(LinkError, match="not a peer"):
        acceptor.receive(dialer.start())
    dialer, acceptor = pair()
    with pytest.raises(LinkError, match="link version"):
        acceptor.receive({**dialer.start(), "v": 2})
    itself = Handshake(KEY, "n2", peer="n2")
    with pytest.raises(LinkError, match="not a peer"):
        Handshake(KEY, "n2", known=lambda name: True).receive(itself.start())


@pytest.mark.parametrize("hello", [
    {"t": "hello", "v": 1, "node": "", "nonce": b"\x00" * 16},
    {"t": "hello", "v": 1, "node": "n1", "nonce": b"short"},
    {"t": "hello", "v": 1, "node": "n1"},
    {"t": "auth", "proof": b"\x00" * 32},  # out of order
])
def test_malformed_or_out_of_order_handshake_frames_are_refused(hello: dict[str, Any]) -> None:
    _, acceptor = pair()
    with pytest.raises(LinkError):
        acceptor.receive(hello)
