"""The gzip-compressed files of a run's record: the same bytes for the same content, and found under the name the
record gives."""

from __future__ import annotations

import gzip

from targetsft.runtime.files import compress_file, gzip_bytes, open_stored, stored_file


def test_gzip_bytes_are_the_same_for_the_same_content():
    data = "".join(f'{{"id": "q{i}", "text": "Ünïcode #### {i}"}}\n' for i in range(200)).encode()
    packed = gzip_bytes(data)
    assert packed == gzip_bytes(data) and gzip.decompress(packed) == data
    assert packed[4:8] == b"\0\0\0\0" and not packed[3] & 0x08  # modification time 0, no file name in the header
    assert len(packed) < len(data) / 5


def test_a_compressed_file_is_found_under_its_plain_name(tmp_path):
    path = tmp_path / "set.generations.jsonl"
    assert stored_file(path) == path  # neither form: the name itself (a reader's error names it)
    path.write_bytes(b'{"id": 1}\n')
    assert stored_file(path) == path
    packed = compress_file(path)
    assert packed == tmp_path / "set.generations.jsonl.gz" and not path.exists()
    assert stored_file(path) == packed == stored_file(packed)
    with open_stored(path) as fh:
        assert fh.read() == b'{"id": 1}\n'
    compressed_again = packed.read_bytes()
    path.write_bytes(b'{"id": 1}\n')
    assert compress_file(path).read_bytes() == compressed_again  # rewritten to the same bytes
    path.write_bytes(b'{"id": 2}\n')  # a plain file beside its .gz is the one read
    with open_stored(path) as fh:
        assert fh.read() == b'{"id": 2}\n'
