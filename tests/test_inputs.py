"""kissray.inputs: files, directories, globs, fsspec URIs and manifests -> titles."""

from __future__ import annotations

import fsspec
import pandas as pd
import pytest

from kissray.errors import UsageError
from kissray.inputs import Title, expand_inputs, read_manifest


@pytest.fixture
def tree(tmp_path):
    """films/{a.mp4, b.MKV, notes.txt, sub/c.webm, sub/d.jpg}"""
    films = tmp_path / "films"
    (films / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.MKV", "notes.txt", "sub/c.webm", "sub/d.jpg"):
        (films / name).write_bytes(b"x")
    return films


def uris(titles):
    return [t.uri for t in titles]


def test_directory_is_searched_recursively_for_video_files(tree):
    titles = expand_inputs([str(tree)])
    assert titles == [Title("a", str(tree / "a.mp4")), Title("b", str(tree / "b.MKV")),
                      Title("c", str(tree / "sub" / "c.webm"))]


def test_files_globs_and_repeats(tree, monkeypatch):
    monkeypatch.chdir(tree)
    titles = expand_inputs(["a.mp4", str(tree / "*.mp4"), str(tree / "sub" / "*.webm"), "sub/../a.mp4"])
    assert uris(titles) == [str(tree / "a.mp4"), str(tree / "sub" / "c.webm")]


def test_a_missing_local_path_is_a_usage_error(tmp_path):
    """SPEC 6: a typo on the command line stops at once; it is never a title of the job."""
    with pytest.raises(UsageError, match="meida: no such file"):
        expand_inputs([str(tmp_path / "meida")])


def test_a_missing_manifest_entry_is_kept_as_a_title_to_fail_later(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("gone.mp4\n")
    assert expand_inputs([str(manifest)]) == [Title("gone", str(tmp_path / "gone.mp4"))]


def test_txt_manifest_with_comments_and_relative_paths(tree, tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# tonight\nfilms/a.mp4\n\n{tree / 'sub' / 'c.webm'}\ns3://bucket/x/e.mp4\n")
    assert expand_inputs([str(manifest)]) == [Title("a", str(tree / "a.mp4")),
                                              Title("c", str(tree / "sub" / "c.webm")),
                                              Title("e", "s3://bucket/x/e.mp4")]


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_table_manifest_with_title_ids(tree, tmp_path, ext):
    table = pd.DataFrame({"uri": [str(tree / "a.mp4"), str(tree / "b.MKV"), "memory://m/z.mp4"],
                          "title_id": ["tt001", "", None]})
    path = tmp_path / f"list.{ext}"
    table.to_csv(path, index=False) if ext == "csv" else table.to_parquet(path)
    assert expand_inputs([str(path)]) == [Title("tt001", str(tree / "a.mp4")), Title("b", str(tree / "b.MKV")),
                                          Title("z", "memory://m/z.mp4")]


def test_manifest_on_an_fsspec_uri_and_memory_directory():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/lib/films/one.mp4": b"x", "/lib/films/deep/two.mov": b"x", "/lib/films/readme.md": b"x",
             "/lib/list.txt": b"memory://lib/films/one.mp4\n"})
    assert expand_inputs(["memory://lib/list.txt"]) == [Title("one", "memory://lib/films/one.mp4")]
    assert uris(expand_inputs(["memory://lib/films"])) == ["memory:///lib/films/deep/two.mov",
                                                         "memory:///lib/films/one.mp4"]
    assert uris(expand_inputs(["memory://lib/films/*.mp4"])) == ["memory:///lib/films/one.mp4"]


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "cannot read manifest"),  # missing
    (lambda p: p.write_text("path\nx.mp4\n"), "no 'uri' column"),
    (lambda p: p.write_bytes(b"\x00\x01 not parquet"), "cannot read manifest"),
])
def test_unreadable_manifest_is_a_usage_error(tmp_path, make, message):
    path = tmp_path / ("list.parquet" if message == "cannot read manifest" else "list.csv")
    make(path)
    with pytest.raises(UsageError, match=message):
        read_manifest(str(path))


def test_duplicate_title_ids_name_both_inputs(tree):
    (tree / "sub" / "a.mov").write_bytes(b"x")
    with pytest.raises(UsageError, match="duplicate title_id 'a'") as info:
        expand_inputs([str(tree)])
    assert str(tree / "a.mp4") in str(info.value) and str(tree / "sub" / "a.mov") in str(info.value)


@pytest.mark.parametrize("inputs,message", [(["{d}/nothing-*.mp4"], "matched no files"), (["{d}/sub"], "no films")])
def test_no_films_is_a_usage_error(tree, inputs, message):
    (tree / "sub" / "c.webm").unlink()
    with pytest.raises(UsageError, match=message):
        expand_inputs([i.format(d=tree) for i in inputs])
