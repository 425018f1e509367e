"""Merging the acknowledgements one read brought, so that a run costs one store write."""

from __future__ import annotations

from chatd.protocol import Ack, Frame

__all__ = ["merge_acks"]


def merge_acks(frames: list[Frame]) -> list[Frame]:
    """Collapse each run of consecutive acknowledgements without ``peer`` into one or two.

    Acknowledgements are cumulative, and ``read`` up to N also acknowledges delivery up to
    N, so a run comes down to its highest ``read`` and, if higher, its highest
    ``delivered``. Each acknowledgement is a store write (an fsync with the durable store),
    so a client that acknowledges every message it gets, and falls behind, catches up in
    one write instead of one per message. Receipts carry the same ids, in fewer frames.

    Args:
        frames: Client frames in the order they arrived.

    Returns:
        The same frames in the same order, each run of acknowledgements merged.
    """
    merged: list[Frame] = []
    run: list[Ack] = []
    for frame in [*frames, None]:
        if isinstance(frame, Ack) and frame.peer is None:
            run.append(frame)
            continue
        if len(run) > 1:
            read = max((ack.upto for ack in run if ack.status == "read"), default=-1)
            delivered = max((ack.upto for ack in run if ack.status == "delivered"), default=-1)
            if read >= 0:
                merged.append(Ack("read", read))
            if delivered > read:
                merged.append(Ack("delivered", delivered))
        else:
            merged.extend(run)
        run = []
        if frame is not None:
            merged.append(frame)
    return merged
