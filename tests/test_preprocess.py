"""Tests of preprocess_omniglot.py on tiny fake zips (see conftest.py), plus one on the real data."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import preprocess_omniglot
from preprocess_omniglot import PreprocessError, main, preprocess

from conftest import FAKE_BACKGROUND, FAKE_EVALUATION, REAL_ZIPS

FAKE_CLASS_COUNT = sum(FAKE_BACKGROUND.values()) + sum(FAKE_EVALUATION.values())


def expected_class_names():
    """The documented order: background then evaluation, alphabets and characters sorted by name."""
    names = []
    for folder, alphabets in (("images_background", FAKE_BACKGROUND), ("images_evaluation", FAKE_EVALUATION)):
        for alphabet in sorted(alphabets):
            names += [f"{folder}/{alphabet}/character{c:02d}" for c in range(1, alphabets[alphabet] + 1)]
    return names


def outputs_in(folder):
    """Every file preprocessing may have left in folder (final or temporary)."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("omniglot"))


def test_output_shape_range_order_and_sidecar(fake_zips, tmp_path):
    out_path = tmp_path / "out" / "omniglot.npy"
    assert preprocess(fake_zips, out_path) == out_path

    omniglot = np.load(out_path)
    assert omniglot.shape == (FAKE_CLASS_COUNT, 20, 1, 28, 28)
    assert omniglot.dtype == np.float32
    assert set(np.unique(omniglot)) == {0.0, 1.0}  # nearest neighbour keeps the drawings binary
    assert 0.0 < omniglot.mean() < 0.5  # strokes (1.0) are the minority, so the PNGs were inverted

    sidecar = json.loads(out_path.with_suffix(".json").read_text())
    assert sidecar["classes"] == expected_class_names()
    assert sidecar["resize"] == "nearest"
    assert sidecar["shape"] == [FAKE_CLASS_COUNT, 20, 1, 28, 28]
    assert set(sidecar["versions"]) >= {"python", "numpy", "pillow"}
    for zip_name, source in sidecar["sources"].items():
        assert source == {"size": (fake_zips / zip_name).stat().st_size,
                          "md5": preprocess_omniglot.file_md5(fake_zips / zip_name)}

    # Each image is the PNG of its class and drawing, in sorted file-name order.
    for class_index, drawing_index in ((0, 0), (2, 7), (FAKE_CLASS_COUNT - 1, 19)):
        class_name = sidecar["classes"][class_index]
        folder = class_name.split("/")[0]
        character = int(class_name[-2:])
        member = f"{class_name}/{character:04d}_{drawing_index + 1:02d}.png"
        with zipfile.ZipFile(fake_zips / f"{folder}.zip") as archive:
            png = Image.open(io.BytesIO(archive.read(member)))
        expected = 1.0 - np.asarray(png.resize((28, 28), Image.Resampling.NEAREST), dtype=np.float32)
        np.testing.assert_array_equal(omniglot[class_index, drawing_index, 0], expected)
    assert outputs_in(out_path.parent) == ["omniglot.json", "omniglot.npy"]


def test_lanczos_gives_antialiased_values(fake_zips, tmp_path):
    out_path = tmp_path / "omniglot.npy"
    preprocess(fake_zips, out_path, resize="lanczos")
    omniglot = np.load(out_path)
    assert omniglot.min() >= 0.0 and omniglot.max() <= 1.0
    assert ((omniglot > 0.0) & (omniglot < 1.0)).any()
    assert json.loads(out_path.with_suffix(".json").read_text())["resize"] == "lanczos"


def test_second_run_keeps_the_output_unless_forced(fake_zips, tmp_path, capsys):
    out_path = tmp_path / "omniglot.npy"
    assert main(["--zips", str(fake_zips), "--out", str(out_path)]) == 0
    first_write = out_path.stat().st_mtime_ns
    time.sleep(0.01)

    assert main(["--zips", str(fake_zips), "--out", str(out_path)]) == 0
    assert out_path.stat().st_mtime_ns == first_write
    assert "kept" in capsys.readouterr().out

    assert main(["--zips", str(fake_zips), "--out", str(out_path), "--force"]) == 0
    assert out_path.stat().st_mtime_ns != first_write


def test_a_different_resize_method_rebuilds(fake_zips, tmp_path):
    out_path = tmp_path / "omniglot.npy"
    preprocess(fake_zips, out_path, resize="nearest")
    preprocess(fake_zips, out_path, resize="lanczos")
    assert json.loads(out_path.with_suffix(".json").read_text())["resize"] == "lanczos"


def damage_truncated(path, write_fake_zip):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_not_a_zip(path, write_fake_zip):
    path.write_bytes(b"this is not a zip file" * 100)


def damage_wrong_layout(path, write_fake_zip):
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("images_background/Zulu_Script/stray.png", b"")


def damage_missing_drawing(path, write_fake_zip):
    write_fake_zip(path, "images_background", FAKE_BACKGROUND, drawings=19)


def damage_missing_alphabet(path, write_fake_zip):
    write_fake_zip(path, "images_background", {"Zulu_Script": 2, "Mid_Script": 3})


def damage_unreadable_png(path, write_fake_zip):
    with zipfile.ZipFile(path) as source:
        entries = [(name, source.read(name)) for name in source.namelist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries:
            archive.writestr(name, b"not a png" if name.endswith("0001_05.png") else data)


@pytest.mark.parametrize("damage, message", [
    (damage_truncated, "not a readable zip"),
    (damage_not_a_zip, "not a readable zip"),
    (damage_wrong_layout, "unexpected entry"),
    (damage_missing_drawing, "has 19 drawings, expected 20"),
    (damage_missing_alphabet, "found 2 alphabets and 5 characters, expected 3 and 5"),
    (damage_unreadable_png, "cannot read images_background/"),
])
def test_bad_zip_fails_clearly_and_leaves_no_output(fake_zips, tmp_path, capsys, write_fake_zip,
                                                    damage, message):
    background_zip = fake_zips / "images_background.zip"
    damage(background_zip, write_fake_zip)
    out_dir = tmp_path / "out"

    assert main(["--zips", str(fake_zips), "--out", str(out_dir / "omniglot.npy")]) == 1
    error = capsys.readouterr().err
    assert str(background_zip) in error
    assert message in error
    assert outputs_in(out_dir) == []


def test_unwritable_output_folder_fails_clearly(fake_zips, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert main(["--zips", str(fake_zips), "--out", str(a_file / "omniglot.npy")]) == 1
    error = capsys.readouterr().err
    assert "output folder" in error and str(a_file) in error


def test_offline_without_zips_says_where_to_put_them(tmp_path, capsys):
    zips_dir = tmp_path / "empty"
    assert main(["--zips", str(zips_dir), "--out", str(tmp_path / "omniglot.npy")]) == 1
    error = capsys.readouterr().err
    assert "put the two Omniglot zips here" in error
    for zip_name in ("images_background.zip", "images_evaluation.zip"):
        assert str(zips_dir.resolve() / zip_name) in error
    assert outputs_in(tmp_path) == []


def test_missing_zip_is_downloaded(fake_zips, tmp_path, monkeypatch):
    stash = tmp_path / "stash"
    stash.mkdir()
    shutil.move(fake_zips / "images_evaluation.zip", stash / "images_evaluation.zip")
    requested = []

    def fake_download(url, destination, expected_md5):
        requested.append(url)
        shutil.copy(stash / Path(destination).name, destination)

    monkeypatch.setattr(preprocess_omniglot, "download", fake_download)
    preprocess(fake_zips, tmp_path / "omniglot.npy")
    assert requested == ["https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip"]
    assert np.load(tmp_path / "omniglot.npy").shape[0] == FAKE_CLASS_COUNT


class FakeResponse(io.BytesIO):
    headers = {}


@pytest.mark.parametrize("md5_matches", [True, False])
def test_download_checks_the_md5(tmp_path, monkeypatch, md5_matches):
    payload = b"zip bytes"
    monkeypatch.setattr(preprocess_omniglot.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(payload))
    destination = tmp_path / "images_background.zip"
    if md5_matches:
        right_md5 = hashlib.md5(payload).hexdigest()
        preprocess_omniglot.download("https://example.invalid/x.zip", destination, right_md5)
        assert destination.read_bytes() == payload
    else:
        with pytest.raises(PreprocessError, match="md5"):
            preprocess_omniglot.download("https://example.invalid/x.zip", destination, "0" * 32)
        assert not destination.exists()
    assert [path.name for path in tmp_path.iterdir()] == (["images_background.zip"] if md5_matches else [])


def test_real_data(real_omniglot_npy):
    out_path, seconds = real_omniglot_npy
    omniglot = np.load(out_path, mmap_mode="r")
    assert omniglot.shape == (1623, 20, 1, 28, 28)
    classes = json.loads(out_path.with_suffix(".json").read_text())["classes"]
    assert sum(name.startswith("images_background/") for name in classes) == 964
    assert sum(name.startswith("images_evaluation/") for name in classes) == 659
    assert seconds < 60, f"preprocessing took {seconds:.1f} s"


# ---------------------------------------------------------------------------------------------
# Reliability: workers die with the script.
# ---------------------------------------------------------------------------------------------

SCRIPT = Path(preprocess_omniglot.__file__)


def process_state(pid):
    """The state letter of process pid ("R", "S", "Z" for a zombie, ...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # after the command name, which may hold spaces


def is_alive(pid):
    return process_state(pid) not in (None, "Z")  # a killed orphan may wait as a zombie for init to reap it


def child_pids(pid):
    """The living children of process pid, found through /proc/*/stat (field 4 is the parent's pid)."""
    children = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat_path.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # ended meanwhile
            continue
        if int(parent) == pid and state != "Z":
            children.append(int(stat_path.parent.name))
    return children


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists processes through /proc (Linux)")
def test_workers_die_when_the_script_is_killed(tmp_path):
    if not (REAL_ZIPS / "images_background.zip").exists():
        pytest.skip(f"the real Omniglot zips are not in {REAL_ZIPS}")
    command = [sys.executable, str(SCRIPT), "--zips", str(REAL_ZIPS), "--out", str(tmp_path / "omniglot.npy")]
    script = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 30
        while len(workers) < preprocess_omniglot.WORKERS and script.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = child_pids(script.pid)
        assert len(workers) == preprocess_omniglot.WORKERS, f"the pool's workers never started: {workers}"

        script.kill()  # SIGKILL: the script runs no cleanup
        script.wait()
        deadline = time.monotonic() + 5
        while any(map(is_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if is_alive(pid)], "workers outlived the killed script"
    finally:
        script.kill()
        script.wait()
        for pid in workers:  # only the workers this test started, should they have survived
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
