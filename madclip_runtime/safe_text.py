"""Showing untrusted text (file names, metadata strings) on a terminal without letting it act on the terminal.

A file name may hold a newline (forging a second line such as "self-test PASSED") or ANSI escape sequences
(clearing the screen, recolouring output). `escape_control` shows every such character as a visible escape
(`\\n`, `\\x1b`, `\\u202e`), so what reaches stderr/stdout is one line of inert text. It is applied by the
CLIs' error line, their log handler and every table cell that holds a name; library messages stay raw (the
exception text keeps the real path for programs).
"""

from __future__ import annotations

import unicodedata

# Categories shown escaped: Cc control (C0, DEL, C1), Cf format (bidi overrides, zero-width), Zl/Zp separators.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}
_SIMPLE = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _SIMPLE:
        return _SIMPLE[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape_control(text: object) -> str:
    """`text` with control/format characters shown as escapes (printable text, spaces and Unicode kept)."""
    s = str(text)
    if s.isprintable():  # fast path: nothing to escape (isprintable is False for every unsafe category)
        return s
    return "".join(
        _escape_char(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES or ch in "\n\r\t" else ch
        for ch in s
    )
