"""Tests of OmniglotNShot on the self-describing fake array of conftest.fake_omniglot_npy."""

import io
import pickle

import numpy as np
import pytest
import torch

import omniglot_nshot
from omniglot_nshot import OmniglotNShot
from preprocess_omniglot import PreprocessError, sidecar_path


def describe(image):
    """(class id, drawing id, quarter turns) of a returned fake image [1, 28, 28].

    The fake array stores the class id in the centre and the drawing id in the corners, which no
    rotation moves; the quarter turns are the k for which rot90(source image, k) is this image."""
    class_id, drawing_id = int(image[0, 13, 13]), int(image[0, 0, 0])
    source = torch.zeros(1, 28, 28)
    source[0, 13:15, 13:15] = class_id
    source[0, [0, 0, 27, 27], [0, 27, 0, 27]] = drawing_id
    source[0, 0, 1] = -1
    turns = [k for k in range(4) if torch.equal(torch.rot90(source, k, dims=(-2, -1)), image)]
    assert len(turns) == 1, "the returned image is not a rotated source image"
    return class_id, drawing_id, turns[0]


def describe_batch(x, y):
    """[(task, class id, drawing id, quarter turns, label)] for every example of a batch."""
    return [(task, *describe(x[task, slot]), int(y[task, slot]))
            for task in range(x.shape[0]) for slot in range(x.shape[1])]


@pytest.fixture(scope="module")
def loader(fake_omniglot_npy):
    return OmniglotNShot(fake_omniglot_npy, task_num=8, n_way=5, k_spt=2, k_qry=3, cache_size=4)


def assert_same_batches(first, second):
    for a, b in zip(first, second):
        for tensor_a, tensor_b in zip(a, b):
            assert torch.equal(tensor_a, tensor_b)


def test_split_is_fixed_disjoint_and_complete(fake_omniglot_npy, loader):
    sizes = {split: len(ids) for split, ids in loader.classes.items()}
    assert sizes == {"train": 1100, "val": 100, "test": 423}
    every_class = np.concatenate([loader.classes[split] for split in ("train", "val", "test")])
    assert sorted(every_class) == list(range(1623))
    np.testing.assert_array_equal(every_class, np.random.default_rng(1).permutation(1623))

    other_seed = OmniglotNShot(fake_omniglot_npy, seed=123, cache_size=1)
    for split in loader.classes:
        np.testing.assert_array_equal(other_seed.classes[split], loader.classes[split])


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_batch_shapes_and_task_invariants(loader, split):
    x_spt, y_spt, x_qry, y_qry = loader.next(split)
    assert x_spt.shape == (8, 10, 1, 28, 28) and x_spt.dtype == torch.float32
    assert x_qry.shape == (8, 15, 1, 28, 28) and x_qry.dtype == torch.float32
    assert y_spt.shape == (8, 10) and y_spt.dtype == torch.int64
    assert y_qry.shape == (8, 15) and y_qry.dtype == torch.int64

    support, query = describe_batch(x_spt, y_spt), describe_batch(x_qry, y_qry)
    for task in range(8):
        task_support = [example[1:] for example in support if example[0] == task]
        task_query = [example[1:] for example in query if example[0] == task]
        # Each class: one label and one rotation, K support and Q query drawings, all distinct.
        class_of_label = {}
        for class_id, drawing_id, turns, label in task_support + task_query:
            assert class_id in loader.classes[split]
            assert class_of_label.setdefault(label, (class_id, turns)) == (class_id, turns)
        assert sorted(class_of_label) == [0, 1, 2, 3, 4]
        assert len({class_id for class_id, _ in class_of_label.values()}) == 5
        for class_id, _ in class_of_label.values():
            support_drawings = [d for c, d, _, _ in task_support if c == class_id]
            query_drawings = [d for c, d, _, _ in task_query if c == class_id]
            assert len(support_drawings) == 2 and len(query_drawings) == 3
            assert len(set(support_drawings) | set(query_drawings)) == 5


def test_labels_and_positions_are_shuffled_per_task(loader):
    _, y_spt, _, _ = loader.next("train")
    support = describe_batch(*loader.next("train")[:2])
    # Labels are not the rank of the class id within the task.
    ranks_match_labels = []
    for task in range(8):
        label_of_class = {class_id: label for t, class_id, _, _, label in support if t == task}
        ranks_match_labels.append([label_of_class[c] for c in sorted(label_of_class)] == [0, 1, 2, 3, 4])
    assert not all(ranks_match_labels)
    # Support examples are not grouped by label.
    assert not all(torch.equal(row, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])) for row in y_spt)


def test_rotations_are_applied_and_can_be_turned_off(fake_omniglot_npy, loader):
    turns = {example[3] for example in describe_batch(*loader.next("train")[:2])}
    assert turns == {0, 1, 2, 3}

    upright = OmniglotNShot(fake_omniglot_npy, task_num=8, k_spt=2, k_qry=3, rotate=False, cache_size=2)
    for split in ("train", "val", "test"):
        x_spt, y_spt, x_qry, y_qry = upright.next(split)
        examples = describe_batch(x_spt, y_spt) + describe_batch(x_qry, y_qry)
        assert {example[3] for example in examples} == {0}


def test_same_seed_same_batches_across_cache_refills(fake_omniglot_npy):
    def batches(seed):
        loader = OmniglotNShot(fake_omniglot_npy, task_num=4, seed=seed, cache_size=2)
        return [loader.next(split) for split in ("train", "val", "train", "train", "test", "train")]

    assert_same_batches(batches(0), batches(0))
    assert not torch.equal(batches(0)[0][0], batches(1)[0][0])


def test_modes_draw_from_independent_streams(fake_omniglot_npy):
    only_train = OmniglotNShot(fake_omniglot_npy, task_num=4, cache_size=2)
    interleaved = OmniglotNShot(fake_omniglot_npy, task_num=4, cache_size=2)
    expected = [only_train.next("train") for _ in range(3)]
    got = []
    for _ in range(3):
        interleaved.next("val")
        got.append(interleaved.next("train"))
    assert_same_batches(expected, got)


@pytest.mark.parametrize("train_batches_before_saving", [0, 3, 4, 5])
def test_state_dict_round_trip_continues_bit_identically(fake_omniglot_npy, train_batches_before_saving):
    # cache_size=4: save before first use, mid-cache, exactly at a used-up cache, just after a refill.
    def fresh():
        return OmniglotNShot(fake_omniglot_npy, task_num=4, seed=7, cache_size=4)

    uninterrupted = fresh()
    for _ in range(train_batches_before_saving):
        uninterrupted.next("train")
    uninterrupted.next("val")
    saved = io.BytesIO()
    torch.save(uninterrupted.state_dict(), saved)  # as a checkpoint would
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    assert pickle.loads(pickle.dumps(state)) == state

    splits = ["train"] * 6 + ["val"] * 5 + ["test"] * 2
    expected = [uninterrupted.next(split) for split in splits]
    resumed = fresh()
    resumed.load_state_dict(state)
    assert_same_batches(expected, [resumed.next(split) for split in splits])


def test_load_state_dict_refuses_other_settings(fake_omniglot_npy, loader):
    with pytest.raises(ValueError, match="settings"):
        OmniglotNShot(fake_omniglot_npy, task_num=4, cache_size=4).load_state_dict(loader.state_dict())


def test_reset_repeats_the_same_tasks(fake_omniglot_npy):
    loader = OmniglotNShot(fake_omniglot_npy, task_num=4, cache_size=2)
    first_validation = [loader.next("val") for _ in range(3)]
    train_next = OmniglotNShot(fake_omniglot_npy, task_num=4, cache_size=2)
    train_next.next("train")
    loader.next("train")
    loader.reset("val")
    assert_same_batches(first_validation, [loader.next("val") for _ in range(3)])
    assert_same_batches([train_next.next("train")], [loader.next("train")])  # train untouched


@pytest.mark.parametrize("arguments, message", [
    (dict(k_spt=5, k_qry=16), "k_spt \\+ k_qry = 21 is more than the 20 drawings"),
    (dict(n_way=101), "n_way 101 is more than the 100 classes of the val split"),
    (dict(n_way=1), "n_way must be at least 2"),
    (dict(task_num=0), "task_num must be at least 1, got 0"),
    (dict(k_spt=0), "k_spt must be at least 1, got 0"),
    (dict(k_qry=-1), "k_qry must be at least 1, got -1"),
    (dict(cache_size=0), "cache_size must be at least 1, got 0"),
])
def test_invalid_arguments_raise_value_error(fake_omniglot_npy, arguments, message):
    with pytest.raises(ValueError, match=message):
        OmniglotNShot(fake_omniglot_npy, **arguments)


def test_unknown_mode_raises_value_error(loader):
    with pytest.raises(ValueError, match="'validation'"):
        loader.next("validation")
    with pytest.raises(ValueError, match="'dev'"):
        loader.reset("dev")


def test_wrong_array_shape_says_how_to_rebuild(tmp_path):
    path = tmp_path / "omniglot.npy"
    np.save(path, np.zeros((10, 20, 1, 28, 28), dtype=np.float32))
    with pytest.raises(PreprocessError, match="preprocess_omniglot.py --force"):
        OmniglotNShot(path)


def test_missing_array_is_preprocessed_first(fake_omniglot_npy, tmp_path, monkeypatch):
    calls = []

    def fake_preprocess(zips_dir, out_path):
        calls.append((zips_dir, out_path))
        out_path.write_bytes(fake_omniglot_npy.read_bytes())
        sidecar_path(out_path).write_bytes(sidecar_path(fake_omniglot_npy).read_bytes())

    monkeypatch.setattr(omniglot_nshot, "preprocess", fake_preprocess)
    path = tmp_path / "data" / "omniglot.npy"
    path.parent.mkdir()
    OmniglotNShot(path, cache_size=1).next("train")
    assert calls == [(path.parent, path)]
