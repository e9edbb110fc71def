"""Safe unzipping of uploads (:mod:`osrm_core.archive`): members that leave the folder, links,
bombs, caps on members and size, encrypted members, and random zips (hypothesis) that extract
inside the destination or fail with one line."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from _helpers import MEMBER, PROPERTY, _all_files, _flip, _random_zip, assert_message, zip_bytes
from hypothesis import given
from hypothesis import strategies as st

from osrm_core.archive import ArchiveError, safe_extract_zip


def test_zip_caps_on_members_and_size(tmp_path):
    many = zip_bytes({f"f{i}": b"1" for i in range(5)})
    with pytest.raises(ArchiveError) as caught:
        safe_extract_zip(many, tmp_path / "a", max_members=4)
    assert_message(str(caught.value), "the archive holds 5 members; at most 4 are allowed")
    big = zip_bytes({"a": b"1" * (3 << 20), "b": b"1" * (2 << 20)})
    with pytest.raises(ArchiveError) as caught:
        safe_extract_zip(big, tmp_path / "b", max_bytes=4 << 20)
    assert_message(str(caught.value), "the archive unpacks to more than 4 MiB")
    encrypted = bytearray(zip_bytes({"secret": b"1"}))  # set the "encrypted" flag in both headers
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        encrypted[encrypted.index(signature) + offset] |= 0x1
    with pytest.raises(ArchiveError) as caught:
        safe_extract_zip(bytes(encrypted), tmp_path / "c")
    assert_message(str(caught.value), "archive member 'secret' is encrypted")
    for folder in ("a", "b", "c"):
        assert not (tmp_path / folder).exists() or not any((tmp_path / folder).iterdir())


@PROPERTY
@given(members=st.lists(MEMBER, max_size=5), flips=st.lists(st.integers(0, 10**6), max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=300)))
def test_random_zips_extract_inside_the_destination_or_fail_cleanly(members, flips, raw):
    data = raw if raw is not None else _flip(_random_zip(members), flips)
    with tempfile.TemporaryDirectory() as sandbox:
        sandbox = Path(sandbox)
        dest = sandbox / "in" / "dest"
        try:
            out = safe_extract_zip(data, dest)
        except ArchiveError as err:
            assert str(err) and "\n" not in str(err)
        else:
            assert out == dest.resolve()
        for p in _all_files(sandbox):
            assert p in (sandbox / "in", dest) or p.is_relative_to(dest), p
            assert not p.is_symlink()


def test_safe_extract_zip_extracts_a_clean_archive(tmp_path):
    out = safe_extract_zip(zip_bytes({"run/config.yaml": b"a: 1", "run/results/x.csv": b"1"}), tmp_path / "x")
    assert (out / "run" / "config.yaml").read_bytes() == b"a: 1"
    assert (out / "run" / "results" / "x.csv").is_file()


@pytest.mark.parametrize(
    ("files", "symlink", "match"),
    [
        ({"../x": b"1"}, None, r"'\.\.'"),
        ({"a/../../x": b"1"}, None, r"'\.\.'"),
        ({"/etc/x": b"1"}, None, "absolute"),
        ({"C:/x": b"1"}, None, "absolute"),
        ({"a\\..\\x": b"1"}, None, "backslash"),
        ({"ok": b"1"}, "link", "symbolic link"),
    ],
)
def test_safe_extract_zip_refuses_unsafe_members(tmp_path, files, symlink, match):
    with pytest.raises(ArchiveError, match=match):
        safe_extract_zip(zip_bytes(files, links=(symlink,) if symlink else ()), tmp_path / "x")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("*"))
    assert not (tmp_path / "x").parent.joinpath("etc").exists()


def test_safe_extract_zip_caps_size_and_members(tmp_path):
    big = zip_bytes({"a": b"0" * 5000, "b": b"0" * 5000})
    with pytest.raises(ArchiveError, match="more than"):
        safe_extract_zip(big, tmp_path / "x", max_bytes=8000)
    with pytest.raises(ArchiveError, match="at most 1"):
        safe_extract_zip(big, tmp_path / "y", max_members=1)
    with pytest.raises(ArchiveError, match="not a valid zip"):
        safe_extract_zip(b"nope", tmp_path / "z")
