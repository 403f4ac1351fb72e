import numpy as np, fsspec
from conftest import make_film
from kissray.media import iter_clips, ClipReader, probe

def test_scratch(s3, tmp_path, film):
    fs = fsspec.filesystem("s3")
    fs.put_file(film, "films/scratch/film.mp4")
    before = s3.bytes_down
    local = list(iter_clips(film, size=32))
    with ClipReader("s3://films/scratch/film.mp4", size=32) as r:
        remote = list(r)
        print("info", r.info)
    print("bytes_read", r.bytes_read, "server", s3.bytes_down - before, "size", fs.size("films/scratch/film.mp4"))
    assert [c.index for c in local] == [c.index for c in remote]
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.log_mel, b.log_mel)
