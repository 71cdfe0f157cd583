"""Protocol constants shared by the broker, the SDK and the console client."""

from __future__ import annotations

from typing import Final

# 3: one frame per message (signature, command, a space, the JSON body).
# 2: three frames (signature, command, body); cumulative RECEIPT by seq; ACCEPTED and
#    DELIVERED carry lists of ids. Still served by the broker (docs/protocol.md, section 3).
PROTOCOL_VERSION: Final = 3
SUPPORTED_VERSIONS = (3, 2)
# Every message starts with "MGP" plus a two-digit version, in the spirit of Majordomo's
# MDPC01: the first bytes of the one frame in version 3, frame 0 in version 2.
SIGNATURE_PREFIX = b"MGP"
SIGNATURE = SIGNATURE_PREFIX + b"%02d" % PROTOCOL_VERSION
SIGNATURE_V2 = b"MGP02"
# Version 3: the byte between the command and the body.
SEPARATOR = b" "
# Version 2: the frames of a message.
FRAME_COUNT_V2 = 3
# The longest command name (HISTORY_PAGE has 12): a version 3 frame with no separator
# within this many bytes after the signature has none that could end a command.
MAX_COMMAND_BYTES = 32

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"

# Defaults of the limits a broker announces in WELCOME (all but MAX_ID_CHARS and
# MAX_REF_CHARS, which are fixed by the protocol); a broker may be configured
# differently, so clients must read the announced values rather than these.
MAX_NAME_CHARS = 32
MAX_TEXT_CHARS = 4096
MAX_TEXT_BYTES = 16384
MAX_BODY_BYTES = 32768
MAX_FRAME_BYTES = 65536
MAX_ID_CHARS = 64
# An ERROR's `ref` echoes a SEND's id up to this length, valid or not, so its sender can
# tell which message was refused.
MAX_REF_CHARS = 256
HEARTBEAT_INTERVAL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000
RATE_PER_SECOND = 50
RATE_BURST = 200
MAX_MAILBOX = 10_000
MAX_HISTORY_PAGE = 200
