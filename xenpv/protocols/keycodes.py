"""Linux input event codes as kbdif carries them, and the HID usages that map to them.

kbdif's KEY events carry Linux input codes (``linux/input-event-codes.h``): keyboard keys
``KEY_*`` and pointer buttons ``BTN_*`` share one number space.  This module holds the
codes xenpv needs by name, the bounds a frontend checks a peer's code against, and the
translation from USB HID usages (HID Usage Tables: page 0x07 Keyboard/Keypad, page 0x09
Button, the Digitizer tip switch) to those codes.  Pure data, no I/O.
"""

from __future__ import annotations

__all__ = [
    "BTN_EXTRA",
    "BTN_LEFT",
    "BTN_MIDDLE",
    "BTN_RIGHT",
    "BTN_SIDE",
    "BTN_TOUCH",
    "KEY_MAX",
    "NAMES",
    "button_for_usage",
    "code_by_name",
    "is_pointer_code",
    "key_for_usage",
    "valid_code",
]

#: Highest key/button code (``KEY_MAX``).
KEY_MAX = 0x2FF
BTN_MOUSE = 0x110
BTN_LEFT = 0x110
BTN_RIGHT = 0x111
BTN_MIDDLE = 0x112
BTN_SIDE = 0x113
BTN_EXTRA = 0x114
BTN_TASK = 0x117
BTN_TOUCH = 0x14A

#: Codes by name (the keys of a keyboard, the mouse buttons, touch).
NAMES: dict[str, int] = {
    "ESC": 1, "1": 2, "2": 3, "3": 4, "4": 5, "5": 6, "6": 7, "7": 8, "8": 9, "9": 10,
    "0": 11, "MINUS": 12, "EQUAL": 13, "BACKSPACE": 14, "TAB": 15, "Q": 16, "W": 17,
    "E": 18, "R": 19, "T": 20, "Y": 21, "U": 22, "I": 23, "O": 24, "P": 25,
    "LEFTBRACE": 26, "RIGHTBRACE": 27, "ENTER": 28, "LEFTCTRL": 29, "A": 30, "S": 31,
    "D": 32, "F": 33, "G": 34, "H": 35, "J": 36, "K": 37, "L": 38, "SEMICOLON": 39,
    "APOSTROPHE": 40, "GRAVE": 41, "LEFTSHIFT": 42, "BACKSLASH": 43, "Z": 44, "X": 45,
    "C": 46, "V": 47, "B": 48, "N": 49, "M": 50, "COMMA": 51, "DOT": 52, "SLASH": 53,
    "RIGHTSHIFT": 54, "KPASTERISK": 55, "LEFTALT": 56, "SPACE": 57, "CAPSLOCK": 58,
    "F1": 59, "F2": 60, "F3": 61, "F4": 62, "F5": 63, "F6": 64, "F7": 65, "F8": 66,
    "F9": 67, "F10": 68, "NUMLOCK": 69, "SCROLLLOCK": 70, "KP7": 71, "KP8": 72, "KP9": 73,
    "KPMINUS": 74, "KP4": 75, "KP5": 76, "KP6": 77, "KPPLUS": 78, "KP1": 79, "KP2": 80,
    "KP3": 81, "KP0": 82, "KPDOT": 83, "102ND": 86, "F11": 87, "F12": 88, "KPENTER": 96,
    "RIGHTCTRL": 97, "KPSLASH": 98, "SYSRQ": 99, "RIGHTALT": 100, "HOME": 102, "UP": 103,
    "PAGEUP": 104, "LEFT": 105, "RIGHT": 106, "END": 107, "DOWN": 108, "PAGEDOWN": 109,
    "INSERT": 110, "DELETE": 111, "POWER": 116, "KPEQUAL": 117, "PAUSE": 119,
    "LEFTMETA": 125, "RIGHTMETA": 126, "COMPOSE": 127,
    "F13": 183, "F14": 184, "F15": 185, "F16": 186, "F17": 187, "F18": 188, "F19": 189,
    "F20": 190, "F21": 191, "F22": 192, "F23": 193, "F24": 194,
    "BTN_LEFT": BTN_LEFT, "BTN_RIGHT": BTN_RIGHT, "BTN_MIDDLE": BTN_MIDDLE,
    "BTN_SIDE": BTN_SIDE, "BTN_EXTRA": BTN_EXTRA, "BTN_TOUCH": BTN_TOUCH,
}  # fmt: skip

# HID Usage Tables, page 0x07 (Keyboard/Keypad): usage -> key name, 0x04 ... 0x73
_KEYBOARD_PAGE: dict[int, str] = {
    **{0x04 + i: chr(ord("A") + i) for i in range(26)},
    **{0x1E + i: str((i + 1) % 10) for i in range(10)},
    0x28: "ENTER", 0x29: "ESC", 0x2A: "BACKSPACE", 0x2B: "TAB", 0x2C: "SPACE", 0x2D: "MINUS",
    0x2E: "EQUAL", 0x2F: "LEFTBRACE", 0x30: "RIGHTBRACE", 0x31: "BACKSLASH",
    0x32: "BACKSLASH", 0x33: "SEMICOLON", 0x34: "APOSTROPHE", 0x35: "GRAVE", 0x36: "COMMA",
    0x37: "DOT", 0x38: "SLASH", 0x39: "CAPSLOCK",
    **{0x3A + i: f"F{i + 1}" for i in range(12)},
    0x46: "SYSRQ", 0x47: "SCROLLLOCK", 0x48: "PAUSE", 0x49: "INSERT", 0x4A: "HOME",
    0x4B: "PAGEUP", 0x4C: "DELETE", 0x4D: "END", 0x4E: "PAGEDOWN", 0x4F: "RIGHT",
    0x50: "LEFT", 0x51: "DOWN", 0x52: "UP", 0x53: "NUMLOCK", 0x54: "KPSLASH",
    0x55: "KPASTERISK", 0x56: "KPMINUS", 0x57: "KPPLUS", 0x58: "KPENTER",
    **{0x59 + i: f"KP{i + 1}" for i in range(9)},
    0x62: "KP0", 0x63: "KPDOT", 0x64: "102ND", 0x65: "COMPOSE", 0x66: "POWER",
    0x67: "KPEQUAL",
    **{0x68 + i: f"F{13 + i}" for i in range(12)},
    0xE0: "LEFTCTRL", 0xE1: "LEFTSHIFT", 0xE2: "LEFTALT", 0xE3: "LEFTMETA",
    0xE4: "RIGHTCTRL", 0xE5: "RIGHTSHIFT", 0xE6: "RIGHTALT", 0xE7: "RIGHTMETA",
}  # fmt: skip
_KEY_BY_USAGE: dict[int, int] = {u: NAMES[n] for u, n in _KEYBOARD_PAGE.items()}


def key_for_usage(usage: int) -> int | None:
    """Linux code of keyboard-page usage ``usage`` (None: no key, e.g. 0 or ErrorRollOver)."""
    return _KEY_BY_USAGE.get(usage)


def button_for_usage(usage: int) -> int | None:
    """Linux code of button-page usage ``usage`` (1 = left, 2 = right, 3 = middle, 4 …
    8 = side, extra, …); None outside 1 … 8."""
    return BTN_MOUSE + usage - 1 if 1 <= usage <= 8 else None


def valid_code(code: int) -> bool:
    """True for a code a frontend accepts in a KEY event (1 … ``KEY_MAX``)."""
    return 0 < code <= KEY_MAX


def is_pointer_code(code: int) -> bool:
    """True for mouse buttons and touch (``BTN_MOUSE`` … ``BTN_TASK``, ``BTN_TOUCH``)."""
    return BTN_MOUSE <= code <= BTN_TASK or code == BTN_TOUCH


def code_by_name(name: str) -> int:
    """The code of ``name`` (``"a"``, ``"KEY_A"``, ``"BTN_LEFT"``, ``"leftctrl"``) or a
    decimal/hex number; ``KeyError`` if unknown."""
    text = name.strip().upper()
    if text.startswith("KEY_"):
        text = text[4:]
    if text in NAMES:
        return NAMES[text]
    try:
        code = int(text, 0)
    except ValueError:
        raise KeyError(name) from None
    if not valid_code(code):
        raise KeyError(name)
    return code
