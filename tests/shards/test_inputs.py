"""Input spellings: PATH, NAME=PATH, CSV/list files; bad ones are user-facing errors naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mim_scale.errors import UserFacingError
from mim_scale.shards.inputs import InputSpec, parse_inputs


def test_path_name_equals_path_and_default_dataset(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b=c").mkdir()  # an existing path with '=' is a path, not NAME=PATH
    specs = parse_inputs([str(tmp_path / "a"), f"lidc={tmp_path / 'a'}", str(tmp_path / "b=c"),
                          InputSpec(tmp_path / "a", "x")], default_dataset="site1")
    assert [(s.path, s.dataset) for s in specs] == [
        (tmp_path / "a", "site1"), (tmp_path / "a", "lidc"), (tmp_path / "b=c", "site1"), (tmp_path / "a", "x")]


def test_csv_list_with_header_comments_and_relative_paths(tmp_path):
    (tmp_path / "d1").mkdir()
    (tmp_path / "v.nii.gz").write_bytes(b"")
    lst = tmp_path / "inputs.csv"
    lst.write_text("dataset,path\n# a comment\nlidc,d1\n\nv.nii.gz\n")
    specs = parse_inputs([f"nlst={lst}"])
    assert [(s.path, s.dataset) for s in specs] == [(tmp_path / "d1", "lidc"), (tmp_path / "v.nii.gz", "nlst")]


@pytest.mark.parametrize("text, match", [
    ("lidc,missing_dir\n", "inputs.csv:1: .*does not exist"),
    ("a,b,c\n", "inputs.csv:1: expected"),
    ("bad name!,d1\n", "inputs.csv:1: dataset name"),
    ("# only a comment\n", "no entries"),
])
def test_bad_lists_name_the_file_and_line(tmp_path, text, match):
    (tmp_path / "d1").mkdir()
    lst = tmp_path / "inputs.csv"
    lst.write_text(text)
    with pytest.raises(UserFacingError, match=match):
        parse_inputs([str(lst)])


def test_missing_input_and_bad_dataset_name(tmp_path):
    with pytest.raises(UserFacingError, match="does not exist"):
        parse_inputs([str(tmp_path / "nope")])
    with pytest.raises(UserFacingError, match="dataset name"):
        InputSpec(Path(tmp_path), "a b")
    with pytest.raises(UserFacingError, match="no inputs"):
        parse_inputs([])
