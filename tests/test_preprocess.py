"""Tests of preprocess_omniglot.py on tiny fake zips (see conftest.py), plus one on the real data."""

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import preprocess_omniglot
from preprocess_omniglot import PreprocessError, load_omniglot, main, preprocess

from conftest import FAKE_BACKGROUND, FAKE_EVALUATION

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


def messages(stderr):
    """The lines of stderr without the progress bar's (tqdm redraws it after each carriage return)."""
    return [line for line in stderr.splitlines() if line and not line.startswith("decoding:")]


@pytest.fixture
def fake_output(fake_zips, tmp_path, monkeypatch):
    """The pair preprocessed from the fake zips, with load_omniglot told to expect their class count."""
    monkeypatch.setattr(preprocess_omniglot, "CLASS_COUNT", FAKE_CLASS_COUNT)
    return preprocess(fake_zips, tmp_path / "data" / "omniglot.npy")


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
    array_bytes = out_path.read_bytes()
    assert sidecar["array"] == {"size": len(array_bytes), "sha256": hashlib.sha256(array_bytes).hexdigest()}
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
    assert not out_dir.exists()  # the output folder it created, removed again


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
    assert not zips_dir.exists()  # created to receive the downloads, removed again


def test_an_array_in_new_folders_without_zips_leaves_no_folder(tmp_path):
    """As training does for a --data that does not exist: the zips are looked for beside the array."""
    out_path = tmp_path / "new" / "data" / "omniglot.npy"
    with pytest.raises(PreprocessError, match="put the two Omniglot zips here"):
        preprocess(out_path.parent, out_path)
    assert list(tmp_path.iterdir()) == []


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
    np.testing.assert_array_equal(load_omniglot(out_path), omniglot)
    classes = json.loads(out_path.with_suffix(".json").read_text())["classes"]
    assert sum(name.startswith("images_background/") for name in classes) == 964
    assert sum(name.startswith("images_evaluation/") for name in classes) == 659
    assert seconds < 60, f"preprocessing took {seconds:.1f} s"


# ---------------------------------------------------------------------------------------------
# Reliability: the pair is always consistent, a bad --out or flag is refused, Ctrl-C leaves nothing.
# ---------------------------------------------------------------------------------------------

SCRIPT = Path(preprocess_omniglot.__file__)


def run_child(code):
    """Run code in a new Python process that has imported preprocess_omniglot with this test's ZIPS."""
    preamble = (f"import os, signal\nimport preprocess_omniglot\nfrom preprocess_omniglot import ZipSpec\n"
                f"preprocess_omniglot.ZIPS = {preprocess_omniglot.ZIPS!r}\n")
    return subprocess.run([sys.executable, "-c", preamble + textwrap.dedent(code)], cwd=SCRIPT.parent,
                          capture_output=True, text=True)


def test_a_kill_between_the_two_renames_leaves_no_pair_that_is_trusted(fake_output, fake_zips, capsys):
    out_path = fake_output  # made with resize="nearest"
    # Rebuild with lanczos in a child process that is killed (SIGKILL: no cleanup runs) at its second
    # rename, so that one file of the pair is new and the other old.
    child_run = run_child(f"""
        renames = []
        def replace_but_die_at_the_second(source, destination, replace=os.replace):
            renames.append(destination)
            if len(renames) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            replace(source, destination)
        os.replace = replace_but_die_at_the_second
        preprocess_omniglot.preprocess({str(fake_zips)!r}, {str(out_path)!r}, force=True, resize="lanczos")
    """)
    assert child_run.returncode == -signal.SIGKILL, child_run.stderr

    stale_resize = json.loads(out_path.with_suffix(".json").read_text())["resize"]
    assert not preprocess_omniglot.existing_output_is_valid(out_path, stale_resize, FAKE_CLASS_COUNT)
    with pytest.raises(PreprocessError, match="does not match"):
        load_omniglot(out_path)
    capsys.readouterr()
    preprocess(fake_zips, out_path, resize=stale_resize)
    assert "kept" not in capsys.readouterr().out
    assert load_omniglot(out_path).shape == (FAKE_CLASS_COUNT, 20, 1, 28, 28)


@pytest.mark.parametrize("folder_at", ["out", "sidecar"])
def test_an_out_that_names_a_folder_is_refused_before_anything_is_written(fake_zips, tmp_path, capsys, folder_at):
    out_path = tmp_path / "data" / "omniglot.npy"
    folder = out_path if folder_at == "out" else out_path.with_suffix(".json")
    folder.mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))

    assert main(["--zips", str(fake_zips), "--out", str(out_path)]) == 2
    [error] = messages(capsys.readouterr().err)
    assert str(folder) in error and "is a folder" in error
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name", ["omniglot.np", "omniglot", "omniglot.json"])
def test_an_out_not_ending_in_npy_is_refused_and_the_pair_beside_it_kept(fake_output, fake_zips, capsys, name):
    """A typo'd name must not build a second array whose sidecar (omniglot.json) is the first one's."""
    pair = {path: path.read_bytes() for path in (fake_output, fake_output.with_suffix(".json"))}
    out_path = fake_output.with_name(name)
    assert main(["--zips", str(fake_zips), "--out", str(out_path)]) == 2
    [error] = messages(capsys.readouterr().err)
    assert f"{out_path} does not end in .npy" in error and "e.g. " + str(fake_output) in error
    assert outputs_in(fake_output.parent) == ["omniglot.json", "omniglot.npy"]
    assert {path: path.read_bytes() for path in pair} == pair
    load_omniglot(fake_output)


@pytest.mark.parametrize("bad_flag, expected", [
    (["--resize", "bicubic"], "argument --resize: invalid choice: 'bicubic'"),
    (["--zips", "data/", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_bad_flag_is_one_line_with_exit_status_2(capsys, bad_flag, expected):
    with pytest.raises(SystemExit) as exit_:
        main(bad_flag)
    assert exit_.value.code == 2
    [error] = capsys.readouterr().err.splitlines()  # no usage dump
    assert error.startswith(f"preprocess_omniglot.py: error: {expected}")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask-022", "umask-027"])
def test_the_pair_gets_the_permissions_the_umask_gives_new_files(fake_zips, tmp_path, umask, mode):
    previous_umask = os.umask(umask)
    try:
        out_path = preprocess(fake_zips, tmp_path / "omniglot.npy")
    finally:
        os.umask(previous_umask)
    assert [stat.S_IMODE(path.stat().st_mode) for path in (out_path, out_path.with_suffix(".json"))] == [mode, mode]


INTERRUPTED = "preprocess_omniglot.py: interrupted; nothing half-written is left"


def test_ctrl_c_while_decoding_is_one_line_with_exit_status_130_and_leaves_nothing(fake_zips, tmp_path):
    out_path = tmp_path / "new" / "omniglot.npy"
    child_run = run_child(f"""
        decode_drawing, decoded = preprocess_omniglot.decode_drawing, []
        def decode_but_press_ctrl_c_at_the_third(png_bytes, resize):
            decoded.append(png_bytes)
            if len(decoded) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in a terminal sends
            return decode_drawing(png_bytes, resize)
        preprocess_omniglot.decode_drawing = decode_but_press_ctrl_c_at_the_third
        raise SystemExit(preprocess_omniglot.main(["--zips", {str(fake_zips)!r}, "--out", {str(out_path)!r}]))
    """)
    assert child_run.returncode == 130, child_run.stderr
    assert messages(child_run.stderr) == [INTERRUPTED]
    assert not out_path.parent.exists()


def test_ctrl_c_while_writing_takes_effect_once_the_pair_is_written(fake_zips, tmp_path):
    out_path = tmp_path / "omniglot.npy"
    child_run = run_child(f"""
        def replace_but_press_ctrl_c_first(source, destination, replace=os.replace):
            os.kill(os.getpid(), signal.SIGINT)
            replace(source, destination)
        os.replace = replace_but_press_ctrl_c_first
        raise SystemExit(preprocess_omniglot.main(["--zips", {str(fake_zips)!r}, "--out", {str(out_path)!r}]))
    """)
    assert child_run.returncode == 130, child_run.stderr
    assert messages(child_run.stderr) == [INTERRUPTED]
    assert outputs_in(tmp_path) == ["omniglot.json", "omniglot.npy"]
    assert preprocess_omniglot.existing_output_is_valid(out_path, "nearest", FAKE_CLASS_COUNT)


def test_a_failed_rename_leaves_nothing_behind(fake_zips, tmp_path, capsys, monkeypatch):
    renames = []

    def replace_but_fail_at_the_second(source, destination, replace=os.replace):
        renames.append(destination)
        if len(renames) == 2:
            raise PermissionError(13, "Permission denied", str(destination))
        replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_but_fail_at_the_second)
    assert main(["--zips", str(fake_zips), "--out", str(tmp_path / "omniglot.npy")]) == 1
    [error] = messages(capsys.readouterr().err)
    assert "Permission denied" in error
    assert outputs_in(tmp_path) == []


def test_an_old_sidecar_without_checksum_is_rebuilt_without_force(fake_output, fake_zips, capsys):
    sidecar_path = fake_output.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    del sidecar["array"]
    sidecar_path.write_text(json.dumps(sidecar))
    capsys.readouterr()

    preprocess(fake_zips, fake_output)
    assert "kept" not in capsys.readouterr().out
    assert "array" in json.loads(sidecar_path.read_text())


# ---------------------------------------------------------------------------------------------
# load_omniglot: what training loads; it builds nothing, and refuses any pair it cannot trust.
# ---------------------------------------------------------------------------------------------


def test_class_count_is_both_zips_together():
    assert preprocess_omniglot.CLASS_COUNT == 964 + 659 == 1623


def test_load_omniglot_returns_the_array(fake_output):
    omniglot = load_omniglot(fake_output)
    assert omniglot.dtype == np.float32 and omniglot.shape == (FAKE_CLASS_COUNT, 20, 1, 28, 28)
    np.testing.assert_array_equal(omniglot, np.load(fake_output))


def rewrite_sidecar(path, change):
    sidecar_path = path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    change(sidecar)
    sidecar_path.write_text(json.dumps(sidecar))


def break_unreadable(path, monkeypatch):
    """Unreadable; as root, chmod cannot make a file unreadable, so read_bytes is told to fail."""
    read_bytes = Path.read_bytes

    def refuse(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)


def break_not_consistent(path, monkeypatch):
    """Another valid array of the same shape in place of the one the sidecar describes."""
    omniglot = np.load(path)
    np.save(path, omniglot[::-1].copy())


def break_all_zeros(path, monkeypatch):
    """All zeros, in a pair that is otherwise consistent."""
    preprocess_omniglot.save_omniglot(path, np.zeros((FAKE_CLASS_COUNT, 20, 1, 28, 28), np.float32), {})


@pytest.mark.parametrize("damage, expected", [
    pytest.param(lambda path, _: path.unlink(), "not found; build it with: python preprocess_omniglot.py --out",
                 id="missing"),
    pytest.param(lambda path, _: (path.unlink(), path.mkdir()),
                 "is a folder, not an array file; name the .npy file, e.g.", id="folder"),
    pytest.param(lambda path, _: (path.unlink(), os.mkfifo(path)), "is not a regular file", id="fifo"),
    pytest.param(break_unreadable, "cannot read", id="unreadable"),
    pytest.param(lambda path, _: path.write_bytes(b""), "is empty", id="empty"),
    pytest.param(lambda path, _: path.write_text("strokes, 1623 classes"), "is not a .npy file", id="text"),
    pytest.param(lambda path, _: path.write_bytes(pickle.dumps(np.load(path))), "is not a .npy file", id="pickle"),
    pytest.param(lambda path, _: np.save(path, np.array([{}], dtype=object), allow_pickle=True),
                 "is not a loadable .npy array (Object arrays cannot be loaded when allow_pickle=False)",
                 id="objects"),
    pytest.param(lambda path, _: path.write_bytes(path.read_bytes()[:-100]), "is not a loadable .npy array (",
                 id="truncated"),
    pytest.param(lambda path, _: np.save(path, np.load(path)[:5]),
                 "holds float32 (5, 20, 1, 28, 28), expected float32 (8,", id="shape"),
    pytest.param(lambda path, _: np.save(path, np.load(path).astype(np.float64)),
                 "holds float64 (8, 20, 1, 28, 28), expected", id="dtype"),
    pytest.param(lambda path, _: path.with_suffix(".json").unlink(), "has no sidecar", id="no-sidecar"),
    pytest.param(lambda path, _: path.with_suffix(".json").write_text("{"), "is not JSON", id="sidecar-not-json"),
    pytest.param(lambda path, _: rewrite_sidecar(path, lambda sidecar: sidecar.pop("array")),
                 "written by an older", id="sidecar-without-checksum"),
    pytest.param(break_not_consistent, "does not match the size and sha256 recorded in its sidecar",
                 id="another-array"),
    pytest.param(lambda path, _: path.write_bytes(path.read_bytes()[:-1] + b"\x01"), "does not match",
                 id="one-byte-changed"),
    pytest.param(break_all_zeros, "holds no strokes", id="all-zeros"),
])
def test_load_omniglot_refuses_what_it_cannot_trust(fake_output, monkeypatch, damage, expected):
    damage(fake_output, monkeypatch)
    with pytest.raises(PreprocessError) as refusal:
        load_omniglot(fake_output)
    message = str(refusal.value)
    assert expected in message and str(fake_output) in message and "\n" not in message
    assert "preprocess_omniglot.py" in message or "e.g. " + str(fake_output / "omniglot.npy") in message


def test_load_omniglot_refuses_an_array_not_ending_in_npy(fake_output):
    """Its sidecar would be another array's: omniglot.np's would be omniglot.npy's omniglot.json."""
    typo = fake_output.with_suffix(".np")
    shutil.copy(fake_output, typo)  # the very bytes that omniglot.json records
    with pytest.raises(PreprocessError) as refusal:
        load_omniglot(typo)
    assert str(refusal.value).startswith(f"{typo} does not end in .npy")
    assert str(refusal.value).endswith(f"e.g. {fake_output}")


def test_load_omniglot_keeps_the_training_wording_for_a_wrong_shape(tmp_path):
    path = tmp_path / "small.npy"
    np.save(path, np.zeros((10, 20, 1, 28, 28), dtype=np.float32))
    with pytest.raises(PreprocessError) as refusal:
        load_omniglot(path)
    assert str(refusal.value) == (
        f"{path} holds float32 (10, 20, 1, 28, 28), expected float32 (1623, 20, 1, 28, 28); "
        f"rebuild it with: python preprocess_omniglot.py --force --out {path}"
    )
