"""The CBOR codec: WebSocket message bytes to frames and back, enforcing the limits.

One binary WebSocket message carries one or more frames as a CBOR sequence (RFC 8742):
complete CBOR items back to back. Senders put frames that are ready together into one
message; receivers take the message apart here.

Decoding is defensive. The message size is checked first; cbor2 decodes with indefinite
lengths, duplicate keys and every semantic tag refused, and a depth bound; then every value
is walked once against the item, string and depth limits before any frame is built, and
the frame's fields are checked against the schema declared in ``_frames``. Every failure,
whatever its cause, surfaces as :class:`ProtocolError` with a stable code.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import cbor2

from ._errors import ErrorCode, ProtocolError
from ._frames import CLIENT_FRAMES, PROTOCOL_VERSIONS, SERVER_FRAMES, Frame, Kind

__all__ = ["Codec", "Limits", "client_codec", "server_codec"]

# Semantic tags cbor2 decodes natively (datetimes, bignums, shared values that can build
# cycles, regular expressions...). Frames use none of them, so all are refused; unknown
# tags are refused by the tag hook.
_NATIVE_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258, 260, 261, 1004,
                55799)


def _refuse_tag(*_args: Any) -> Any:
    raise ValueError("CBOR tags are not allowed")


_REFUSE_TAGS = dict.fromkeys(_NATIVE_TAGS, _refuse_tag)


@attrs.frozen
class Limits:
    """Bounds on what one WebSocket message may contain. docs/protocol.md lists defaults."""

    max_frame_bytes: int = 65536
    max_frames: int = 128
    max_depth: int = 4
    max_items: int = 1024
    max_string_bytes: int = 16384


@attrs.frozen
class _FieldSpec:
    attr: str
    wire: str
    kind: Kind
    optional: bool
    default: Any


def _schema(cls: type[Frame], version: int) -> tuple[tuple[_FieldSpec, ...], frozenset[str]]:
    """The field specs of a frame class in ``version`` and the set of wire keys it accepts."""
    specs = []
    for f in attrs.fields(cls):
        meta = f.metadata
        if meta["since"] > version:
            continue
        specs.append(_FieldSpec(f.name, meta["wire"] or f.name, meta["kind"], meta["optional"],
                                f.default if meta["optional"] else None))
    return tuple(specs), frozenset({"t", *(s.wire for s in specs)})


# Built once from the frame declarations and never changed: every codec shares them.
_SCHEMAS = {
    version: {cls: _schema(cls, version)
              for cls in (*CLIENT_FRAMES.values(), *SERVER_FRAMES.values())
              if version >= cls.SINCE}
    for version in PROTOCOL_VERSIONS
}


class Codec:
    """Turns message bytes into frames of one direction, and frames into message bytes.

    A codec speaks one protocol version at a time, the newest until :attr:`version` is
    set to the one negotiated: frames and fields of later versions are neither decoded
    (``unknown_type``, ``unknown_field``) nor encoded (a field is left out; encoding a
    frame type of a later version is a programming error).

    Args:
        frames: The frame types this side may receive, by type tag.
        limits: The bounds to enforce while decoding.
    """

    __slots__ = ("_all_types", "_limits", "_schemas", "_types", "_version")

    def __init__(self, frames: Mapping[str, type[Frame]], limits: Limits | None = None) -> None:
        self._limits = limits or Limits()
        self._all_types = frames
        self._version = 0
        self._types: Mapping[str, type[Frame]] = {}
        self._schemas = _SCHEMAS[PROTOCOL_VERSIONS[-1]]
        self.version = PROTOCOL_VERSIONS[-1]

    @property
    def version(self) -> int:
        """The protocol version frames are decoded and encoded in."""
        return self._version

    @version.setter
    def version(self, version: int) -> None:
        self._schemas = _SCHEMAS[version]
        self._types = {tag: cls for tag, cls in self._all_types.items()
                       if version >= cls.SINCE}
        self._version = version

    @property
    def limits(self) -> Limits:
        """The limits this codec enforces."""
        return self._limits

    def decode(self, data: bytes | bytearray | str) -> list[Frame]:
        """Decode one WebSocket message into its frames.

        Args:
            data: The message payload; a ``str`` means the peer sent a text message.

        Returns:
            The frames, in order; at least one.

        Raises:
            ProtocolError: The message breaks the encoding, a limit or the schema.
        """
        if isinstance(data, str):
            raise ProtocolError(ErrorCode.TEXT_FRAME, "frames travel in binary messages")
        limits = self._limits
        if len(data) > limits.max_frame_bytes:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                                f"message of {len(data)} bytes exceeds {limits.max_frame_bytes}")
        if not data:
            raise ProtocolError(ErrorCode.BAD_CBOR, "empty message")
        fp = io.BytesIO(data)
        decoder = cbor2.CBORDecoder(
            fp, read_size=1, max_depth=limits.max_depth, allow_indefinite=False,
            allow_duplicate_keys=False, tag_hook=_refuse_tag, semantic_decoders=_REFUSE_TAGS)
        frames: list[Frame] = []
        while fp.tell() < len(data):
            if len(frames) == limits.max_frames:
                raise ProtocolError(ErrorCode.TOO_MANY_FRAMES,
                                    f"more than {limits.max_frames} frames in one message")
            start = fp.tell()
            try:
                item = decoder.decode()
            except RecursionError:
                raise ProtocolError(ErrorCode.TOO_DEEP, "nesting too deep") from None
            except Exception:
                if _too_deep(data, start, fp.tell(), limits.max_depth):
                    raise ProtocolError(ErrorCode.TOO_DEEP,
                                        f"nesting deeper than {limits.max_depth}") from None
                raise ProtocolError(ErrorCode.BAD_CBOR, "not well-formed CBOR") from None
            self._walk(item, 1)
            frames.append(self._frame(item))
        return frames

    def encode(self, frames: Iterable[Frame]) -> bytes:
        """Encode frames into one WebSocket message (a CBOR sequence)."""
        return b"".join(cbor2.dumps(self.to_wire(frame)) for frame in frames)

    def to_wire(self, frame: Frame) -> dict[str, Any]:
        """Return the CBOR map of ``frame``: the type tag plus every field that is set."""
        wire: dict[str, Any] = {"t": frame.TYPE}
        for spec in self._schemas[type(frame)][0]:
            value = getattr(frame, spec.attr)
            if spec.optional and value == spec.default:
                continue
            wire[spec.wire] = value
        return wire

    def _walk(self, value: Any, depth: int) -> None:
        limits = self._limits
        if depth > limits.max_depth:
            raise ProtocolError(ErrorCode.TOO_DEEP, f"nesting deeper than {limits.max_depth}")
        kind = type(value)
        if kind is str:
            if len(value) * 4 > limits.max_string_bytes and (
                    len(value.encode()) > limits.max_string_bytes):
                raise _too_long(limits.max_string_bytes)
        elif kind is dict:
            if len(value) > limits.max_items:
                raise ProtocolError(ErrorCode.TOO_MANY_ITEMS,
                                    f"map of more than {limits.max_items} keys")
            # Keys, and the text and integers that are most values, are checked here rather
            # than in a call each (a frame is a map of a few of them): the same checks, in
            # the same order, as the calls would make.
            too_deep = depth + 1 > limits.max_depth
            longest = limits.max_string_bytes
            for key, item in value.items():
                if type(key) is not str:
                    raise ProtocolError(ErrorCode.BAD_FIELD, "map keys must be text strings")
                if too_deep:
                    self._walk(key, depth + 1)
                if len(key) * 4 > longest and len(key.encode()) > longest:
                    raise _too_long(longest)
                if type(item) is str:
                    if len(item) * 4 > longest and len(item.encode()) > longest:
                        raise _too_long(longest)
                elif type(item) is not int:
                    self._walk(item, depth + 1)
        elif kind is list:
            if len(value) > limits.max_items:
                raise ProtocolError(ErrorCode.TOO_MANY_ITEMS,
                                    f"array of more than {limits.max_items} items")
            for item in value:
                self._walk(item, depth + 1)
        elif kind is bytes:
            if len(value) > limits.max_string_bytes:
                raise ProtocolError(ErrorCode.STRING_TOO_LONG,
                                    f"byte string longer than {limits.max_string_bytes} bytes")
        elif kind not in (int, bool, float) and value is not None:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"values of type {kind.__name__} not allowed")

    def _frame(self, item: Any) -> Frame:
        if type(item) is not dict:
            raise ProtocolError(ErrorCode.NOT_A_MAP, "a frame is a CBOR map")
        tag = item.get("t")
        if tag is None:
            raise ProtocolError(ErrorCode.MISSING_FIELD, "frame has no type tag 't'")
        cls = self._types.get(tag) if type(tag) is str else None
        if cls is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {str(tag)[:32]!r}")
        schema, keys = self._schemas[cls]
        for key in item:
            if key not in keys:
                raise ProtocolError(ErrorCode.UNKNOWN_FIELD,
                                    f"{tag} frame has unknown field {key[:32]!r}")
        kwargs = {}
        for spec in schema:
            value = item.get(spec.wire)
            if value is None:
                if spec.optional:
                    continue
                raise ProtocolError(ErrorCode.MISSING_FIELD, f"{tag} frame needs {spec.wire!r}")
            if not spec.kind.accepts(value):
                raise ProtocolError(ErrorCode.BAD_FIELD,
                                    f"{tag}.{spec.wire} must be {spec.kind.value}")
            kwargs[spec.attr] = value
        return cls(**kwargs)


def _too_long(longest: int) -> ProtocolError:
    return ProtocolError(ErrorCode.STRING_TOO_LONG, f"string longer than {longest} bytes")


def _too_deep(data: bytes | bytearray, start: int, failed_at: int, max_depth: int) -> bool:
    """Whether the item at ``start`` failed to decode because of the depth bound.

    cbor2 reports its depth bound with the same exception class as malformed input, and
    its message is not an interface. So the item is decoded once more, byte by byte, with
    the bound one deeper: malformed input fails at the very byte it failed at before,
    while an item that was only too deep gets further (or decodes). An item cut short just
    after the header that went too deep fails at the same byte and counts as malformed.
    Only a refused message pays for this.
    """
    fp = io.BytesIO(data)
    fp.seek(start)
    decoder = cbor2.CBORDecoder(
        fp, read_size=1, max_depth=max_depth + 1, allow_indefinite=False,
        allow_duplicate_keys=False, tag_hook=_refuse_tag, semantic_decoders=_REFUSE_TAGS)
    try:
        decoder.decode()
    except RecursionError:
        return True
    except Exception:
        return fp.tell() > failed_at
    return True


def server_codec(limits: Limits | None = None) -> Codec:
    """A codec for the server side: decodes client frames."""
    return Codec(CLIENT_FRAMES, limits)


def client_codec(limits: Limits | None = None) -> Codec:
    """A codec for the client side: decodes server frames."""
    return Codec(SERVER_FRAMES, limits)
