"""The masking of exec/attach output: each WebSocket frame from the API server, per output channel, by one
streaming masker for the whole session (`stream.py`)."""

from __future__ import annotations

import base64

from kubegate.core.flow import Flow, Frame, FrameDirection, Session

from .masker import masking_of
from .settings import PLUGIN_NAME
from .stream import ChannelMaskers

# The WebSocket sessions a masked connection serves: a pod's exec and attach (their output masked here) and
# port-forward (its data is not masked, see masking.md).
POD_SESSIONS = ("exec", "attach", "portforward")
WEBSOCKET_REFUSAL = (
    "on this connection a WebSocket is served for a pod's exec, attach and port-forward only: the API "
    "server would stream anything else over it (a watch, a log, a proxied answer) where it is not masked; "
    "send it as a plain HTTP request"
)


def is_pod_session(flow: Flow) -> bool:
    a = flow.attributes
    return a.api_group == "" and a.resource == "pods" and a.subresource in POD_SESSIONS


def mask_exec_frame(flow: Flow, session: Session, frame: Frame) -> None:
    """Mask one frame of exec/attach output in place (held, dropped or rewritten); port-forward frames
    pass; a frame of any other session is dropped (never served: `kubegate_decide` refuses them)."""
    masking = masking_of(flow)
    if masking is None or frame.direction != FrameDirection.UPSTREAM_TO_CLIENT:
        return
    if not is_pod_session(flow):
        frame.drop = True  # nothing goes out unread
        return
    if flow.attributes.subresource == "portforward":
        return
    # One streaming masker per output channel for the whole session (stream.py): a secret split across
    # frames is held until it is complete, or until no frame came for `exec_hold_ms` (then it goes out as
    # it stands, and the rest of it is masked when it comes). Base64 protocols (`base64.channel.k8s.io`,
    # `v4.base64…`; web terminals): text frames, a digit for the channel, then the data in base64.
    base64_frames = "base64" in session.subprotocol
    output: ChannelMaskers | None = session.state.get(PLUGIN_NAME)
    if output is None:
        output = session.state[PLUGIN_NAME] = ChannelMaskers(
            masking.text, masking.settings.max_secret_bytes, masking.settings.exec_hold_from, base64_frames
        )
    output.use(masking.text)  # the known values may have changed since the last frame
    if frame.flush:
        # Timer tick or end of stream: what is held goes out now.
        held = output.flush()
        if held:
            frame.before, frame.data, frame.text = held[:-1], held[-1], base64_frames
        return
    if frame.text != base64_frames:
        # Not this protocol's kind of frame (a text frame on a binary protocol): no channel to carry for,
        # masked as it stands rather than passed unread.
        frame.data = masking.text.mask_bytes(frame.data)
        return
    channel, data = _channel_data(frame, base64_frames)
    if channel in (1, 2):
        if data is None:  # not base64 after all: nothing of it goes out unread
            frame.data = frame.data[:1]
            return
        out = output.output(channel, data)
        if out is None:
            frame.drop = True
        else:
            frame.data = out
        if output.holding:
            session.flush_after = masking.settings.exec_hold_ms / 1000
        return
    # Another channel (the exit status, a v5 close): whatever stdout/stderr still hold goes out before it.
    frame.before = output.flush()


def _channel_data(frame: Frame, base64_frames: bool) -> tuple[int | None, bytes | None]:
    """A frame's channel and data (None when a base64 frame's data is not base64)."""
    if not frame.data:
        return None, b""
    if not base64_frames:
        return frame.data[0], frame.data[1:]
    digit = frame.data[:1]
    if not digit.isdigit():
        return None, None
    try:
        return int(digit), base64.b64decode(frame.data[1:], validate=True)
    except ValueError:
        return int(digit), None
