"""Layout (xenpv.protocols.layout) on small records written for the purpose: tail
padding, element counts of 1 and 2, byte strings, the numpy view's shapes, and every
refusal's text."""

from __future__ import annotations

import struct

import pytest

from xenpv.errors import LocalError
from xenpv.protocols.layout import Field, Layout


def test_tail_padding_counts_and_byte_strings() -> None:
    rec = Layout("rec", [Field("a", "B"), Field("pair", "H", 2), Field("tag", "s", 1),
                         Field("name", "s", 3)], pad_to=12)
    assert rec.size == 12 and rec.padding() == [(9, 3)]
    assert rec.offsets == {"a": 0, "pair": 1, "tag": 5, "name": 6}
    raw = rec.pack((7, (0x102, 0x304), b"t", b"ab"))
    assert raw == struct.pack("<B2Hs3s3x", 7, 0x102, 0x304, b"t", b"ab")
    assert rec.unpack_from(raw) == (7, (0x102, 0x304), b"t", b"ab\0")
    dt = rec.dtype_for(16)
    assert dt.itemsize == 16
    assert dt.fields["pair"][0].shape == (2,) and dt.fields["pair"][1] == 1
    assert dt.fields["tag"][0].shape == (1,) and dt.fields["name"][0].shape == (3,)
    assert dt.fields["a"][0].shape == ()
    with pytest.raises(LocalError, match=r"^small: pad_to 1 < size 2$"):
        Layout("small", [Field("a", "H")], pad_to=1)


def test_refusal_texts() -> None:
    rec = Layout("rec", [Field("a", "B"), Field("pair", "H", 2), Field("name", "s", 3)])
    for values, text in [
        ((1, (1, 2)), r"^rec: expected 3 values, got 2$"),
        ((1, (1, 2, 3), b""), r"^rec\.pair: at most 2 entries, got 3$"),
        ((1, (1, 2), b"abcd"), r"^rec\.name: at most 3 bytes, got 4$"),
        ((256, (1, 2), b""), r"^rec: value out of range: "),
    ]:
        with pytest.raises(LocalError, match=text):
            rec.pack(values)
    inner = Layout("inner", [Field("x", "B")])
    outer = Layout("outer", [Field("seg", "", 2, sub=inner)])
    assert outer.pack(([(1,)],)) == b"\x01\x00"  # missing elements are zero
    with pytest.raises(LocalError, match=r"^outer\.seg: at most 2 entries, got 3$"):
        outer.pack(([(1,), (2,), (3,)],))
    with pytest.raises(LocalError, match=r"^rec: negative offset -1$"):
        rec.unpack_from(bytes(16), -1)
