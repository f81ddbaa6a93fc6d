"""Unit tests of the xenstore path rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.errors import LocalError
from xenpv.xenstore import paths
from xenpv.xenstore.paths import InvalidPathError, validate_path


@pytest.mark.parametrize(
    "path",
    ["/", "/local", "/local/domain/0/name", "device/vif/0", "a-b_c/D9", "@releaseDomain",
     "@introduceDomain", "@releaseDomain/5", "/" + "a" * 3071, "b" * 2048],
)
def test_valid_paths(path: str) -> None:
    validate_path(path)


@pytest.mark.parametrize(
    "path",
    ["", "//", "/a//b", "/a/", "a/", "/a b", "/a.b", "/é", "/a@b", "a@", "@", "@/x",
     "/" + "a" * 3072, "b" * 2049, "/a\0b"],
)
def test_invalid_paths(path: str) -> None:
    with pytest.raises(InvalidPathError):
        validate_path(path)


def test_invalid_path_error_is_local_and_value_error() -> None:
    assert issubclass(InvalidPathError, LocalError)
    assert issubclass(InvalidPathError, ValueError)


def test_special_names_can_be_refused() -> None:
    with pytest.raises(InvalidPathError):
        validate_path("@releaseDomain", allow_special=False)
    assert paths.is_special("@x") and paths.is_special(b"@x") and not paths.is_special("/x")


def test_bytes_paths() -> None:
    validate_path(b"/local/domain")
    with pytest.raises(InvalidPathError):
        validate_path(b"/\xff")


def test_resolve_and_relative_to() -> None:
    assert paths.resolve("device/vif", 3) == "/local/domain/3/device/vif"
    assert paths.resolve("/abs", 3) == "/abs"
    assert paths.resolve("@releaseDomain", 3) == "@releaseDomain"
    assert paths.relative_to("/local/domain/3/device/vif", 3) == "device/vif"
    assert paths.relative_to("/local/domain/3", 3) == "/local/domain/3"
    assert paths.relative_to("/local/domain/30/x", 3) == "/local/domain/30/x"
    assert paths.domain_path(7) == "/local/domain/7"


def test_is_child() -> None:
    assert paths.is_child("/a/b", "/a") and paths.is_child("/a", "/a")
    assert not paths.is_child("/ab", "/a")
    assert paths.is_child("/anything", "/")
    assert not paths.is_child("@releaseDomain", "/")


def test_parent_basename_join() -> None:
    assert paths.parent("/a/b") == "/a" and paths.parent("/a") == "/" and paths.parent("/") == "/"
    assert paths.basename("/a/b") == "b" and paths.basename("/") == ""
    assert paths.join_path("/", "a") == "/a" and paths.join_path("/a", "b") == "/a/b"


def _reference_valid(p: str, allow_special: bool = True) -> bool:
    """The rules of xen-protocols.md §4.1 written out plainly."""
    if not p:
        return False
    body = p
    if p[0] == "@":
        if not allow_special or len(p) == 1 or p[1] == "/":
            return False
        body = p[1:]
    if len(p) > (3072 if p[0] == "/" else 2048):
        return False
    if any(not (c.isascii() and (c.isalnum() or c in "-/_")) for c in body):
        return False
    if "//" in body:
        return False
    return not (body.endswith("/") and p != "/")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="/ab-_@.0 ", max_size=12), st.booleans())
def test_validate_path_agrees_with_the_plain_rules(path: str, special: bool) -> None:
    try:
        validate_path(path, allow_special=special)
        ok = True
    except InvalidPathError:
        ok = False
    assert ok == _reference_valid(path, special)
