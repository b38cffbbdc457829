"""Files of older formats keep working: every committed checkpoint resumes and every published model.pt
evaluates with every later commit (run_files.py, "Files of older formats keep working").

tests/fixtures/ holds one real file of each older format, written by the code of its time (fixtures/README.md
says how): a format-3 checkpoint.pt and a format-1 model.pt. When a format changes, the file of the format
before it is added here, with its upgrade in run_files.UPGRADES.
"""
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import maml_omniglot
import run_files

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT_3 = FIXTURES / "checkpoint-format3.pt"
MODEL_1 = FIXTURES / "model-format1.pt"


def stored(path):
    """The file as it lies on disk, without any upgrade."""
    return torch.load(path, map_location="cpu", weights_only=False)


def test_the_fixtures_are_of_the_older_formats():
    assert stored(CHECKPOINT_3)["format"] == 3 and run_files.CHECKPOINT_FORMAT == 4
    assert stored(MODEL_1)["format"] == 1 and run_files.MODEL_FORMAT == 2


def test_a_format_3_checkpoint_restores_theta_adam_the_sampler_and_the_run(learnable_omniglot_npy):
    checkpoint = run_files.read_checkpoint(CHECKPOINT_3)
    old = stored(CHECKPOINT_3)
    cfg = dict(checkpoint["config"], data=str(learnable_omniglot_npy))
    sampler, meta_learner = maml_omniglot.sampler_and_meta_learner(cfg)
    state = run_files.restore(checkpoint, meta_learner, sampler)

    theta = meta_learner.theta()
    assert len(theta) == len(old["net"]) == 14
    assert all(torch.equal(p, old["net"][f"vars.{i}"]) for i, p in enumerate(theta))
    adam = meta_learner.meta_optim.state
    assert all(int(adam[p]["step"]) == state.iteration == old["run"]["iteration"] == 5 for p in theta)
    assert state.log == old["run"]["log"] and state.segments == old["run"]["segments"]

    before = [p.detach().clone() for p in theta]
    loss, accs = meta_learner(*sampler.next("train"))  # the run goes on from there
    assert all(not torch.equal(p, b) for p, b in zip(theta, before)) and 0 < loss < 10


def test_a_format_3_checkpoint_resumes_with_its_own_command(tmp_path):
    """The resume check passes: the checkpoint's config, completed by ADDED_CONFIG, is today's for its command."""
    old = stored(CHECKPOINT_3)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(CHECKPOINT_3, out / "checkpoint.pt")
    argv = shlex.split(old["run"]["segments"][-1]["command"])[2:] + ["--resume"]
    argv[argv.index("--out") + 1] = str(out)  # where it lies now: a change a resume may make
    parser = maml_omniglot.build_parser()
    cfg = maml_omniglot.resolve_config(parser.parse_args(argv), parser)
    with run_files.RunFolder(str(out), resume=True) as folder:
        checkpoint = folder.resume_point(cfg)
    assert checkpoint["run"]["iteration"] == 5 and list(checkpoint["theta"])[0] == "net.weights.0"


def test_a_checkpoint_written_today_reads_back_as_it_was_written(learnable_omniglot_npy, tmp_path):
    checkpoint = run_files.read_checkpoint(CHECKPOINT_3)
    cfg = dict(checkpoint["config"], data=str(learnable_omniglot_npy))
    sampler, meta_learner = maml_omniglot.sampler_and_meta_learner(cfg)
    state = run_files.restore(checkpoint, meta_learner, sampler)
    run_files.write_checkpoint(tmp_path / "checkpoint.pt", cfg, state, meta_learner, sampler)
    again = run_files.read_checkpoint(tmp_path / "checkpoint.pt")
    assert stored(tmp_path / "checkpoint.pt")["format"] == run_files.CHECKPOINT_FORMAT
    assert again["theta"].keys() == checkpoint["theta"].keys()
    assert all(torch.equal(again["theta"][k], checkpoint["theta"][k]) for k in checkpoint["theta"])


def test_a_format_1_model_evaluates(learnable_omniglot_npy, capsys):
    model = run_files.read_model(MODEL_1)
    old = stored(MODEL_1)
    assert all(torch.equal(model["theta"][f"net.weights.{i}"], old["state_dict"][f"vars.{i}"])
               for i in range(len(old["param_names"])))
    assert maml_omniglot.main(["--evaluate", str(MODEL_1), "--data", str(learnable_omniglot_npy), "--device", "cpu",
                               "--test-tasks", "4"]) == 0
    assert "4 test tasks" in capsys.readouterr().out


def test_a_key_added_to_the_config_later_gets_its_default_in_old_files(monkeypatch):
    monkeypatch.setattr(run_files, "ADDED_CONFIG", {"a_new_option": 7, "seed": 123})
    for config in (run_files.read_checkpoint(CHECKPOINT_3)["config"], run_files.read_model(MODEL_1)["config"]):
        assert config["a_new_option"] == 7
        assert config["seed"] == 0  # a key the file has keeps its value


@pytest.mark.parametrize("path, kind", [(CHECKPOINT_3, "model.pt"), (MODEL_1, "checkpoint.pt")])
def test_one_kind_of_file_given_for_the_other_is_named(path, kind):
    read = run_files.read_model if kind == "model.pt" else run_files.read_checkpoint
    with pytest.raises(run_files.RunFileError) as error:
        read(path)
    assert f"is not a {kind}" in str(error.value) or f"not a {kind}" in str(error.value)
