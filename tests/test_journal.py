"""The one journal (``landscape.journal``, issue 27 item 2) and the one spelling of recorded facts.

A torn or corrupted last line is dropped and cut off before the next append; a damaged line
followed by an intact one is refused in one line; every append is fsynced; a stored identity that
differs is refused naming every differing field; identities that spell a fact as earlier files did
(``corpus_seed``, ``precision``, corpus ``embedded default``) compare under the settings' names.
"""

import os

import pytest

from landscape import identity
from landscape.errors import SettingsMismatch
from landscape.journal import MAGIC, Journal, JsonLines
from landscape.schema import DamagedFile

IDENTITY = {"seed": 0, "lr": 0.1, identity.MODEL_KEY: "v2:0123456789abcdef"}


def _journal(path, ident=IDENTITY, **options):
    return Journal(path, "test", ident, what="test journal", remedy="delete it", **options)


def test_records_come_back_and_each_append_is_one_fsynced_write(tmp_path, monkeypatch):
    path = tmp_path / "j"
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    journal = _journal(path)
    before = len(synced)
    journal.append({"i": 0, "v": "a"}, {"i": 1, "v": "b"})
    journal.append({"i": 2, "v": "c"})
    assert len(synced) - before == 2  # one per append (a batch of records is one write)
    lines = path.read_bytes().split(b"\n")
    assert lines[0].startswith(f"{MAGIC} test ".encode()) and lines[-1] == b"" and len(lines) == 5
    assert _journal(path).records == [{"i": 0, "v": "a"}, {"i": 1, "v": "b"}, {"i": 2, "v": "c"}]


@pytest.mark.parametrize("tail", [b'{"i": 2, "v"', b"garbage 01234567\n", b'{"i": 2, "v": "c"} 00000000\n'])
def test_a_torn_or_corrupted_last_line_is_dropped_and_cut_before_the_next_append(tmp_path, tail):
    path = tmp_path / "j"
    _journal(path).append({"i": 0}, {"i": 1})
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    journal = _journal(path)
    assert journal.dropped_tail and journal.records == [{"i": 0}, {"i": 1}]
    assert path.read_bytes() == whole
    journal.append({"i": 2})
    assert _journal(path).records == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_a_damaged_line_before_an_intact_one_is_refused_in_one_line(tmp_path):
    path = tmp_path / "j"
    _journal(path).append({"i": 0}, {"i": 1}, {"i": 2})
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"i": 1', b'"i": 7')  # its CRC-32 no longer matches
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DamagedFile) as refused:
        _journal(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "line 3" in message and "delete it" in message
    assert path.read_bytes() == b"\n".join(lines)  # left as it was


def test_a_file_of_another_kind_is_refused_and_a_cut_header_starts_afresh(tmp_path):
    path = tmp_path / "j"
    path.write_bytes(JsonLines("other").header(IDENTITY))
    with pytest.raises(DamagedFile, match="not a test journal"):
        _journal(path)
    path.write_bytes(f"{MAGIC} te".encode())  # a kill while the header was written
    assert _journal(path).records == [] and JsonLines("test").read_header(path.read_bytes().rstrip(b"\n"))


def test_other_settings_are_refused_naming_every_field_that_differs(tmp_path):
    path = tmp_path / "j"
    _journal(path).append({"i": 0})
    with pytest.raises(SettingsMismatch) as refused:
        _journal(path, dict(IDENTITY, seed=1, lr=0.2))
    assert "seed 0 then, 1 now" in str(refused.value) and "lr 0.1 then, 0.2 now" in str(refused.value)
    with pytest.raises(SettingsMismatch, match="the model changed"):
        _journal(path, dict(IDENTITY, **{identity.MODEL_KEY: "v2:fedcba9876543210"}))
    assert _journal(path, dict(IDENTITY, unused=None)).records == [{"i": 0}]  # a key one side lacks, None: the same


def test_facts_spelled_as_earlier_files_did_compare_under_the_settings_names():
    old = {"corpus_seed": 3, "precision": "float32", "corpus": "embedded default", "seq_len": 16}
    new = {"seed": 3, "dtype": "float32", "corpus": "embedded", "seq_len": 16}
    assert identity.differences(old, new) == []
    assert identity.differences(old, dict(new, seed=4, dtype="bfloat16")) == ["dtype", "seed"]
    # Where both spellings are recorded they are two facts (a surface's parameter dtype and its precision).
    assert identity.differences({"precision": "tf32", "dtype": "float32"}, {"precision": "float32",
                                                                             "dtype": "float32"}) == ["precision"]
