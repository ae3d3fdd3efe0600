"""A checkpoint is data, never code (issue 28): a checkpoint of a real training, edited to name code the
project does not build, is refused by predict, evaluate, validate and a `ckpt_path=` start of training,
with one `error:` line naming the file and the key, exit code 2, no traceback, and nothing run."""

import base64
import copy
import os
import pickle
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_seg import evaluate, predict, training, validate
from lightning_seg.checkpoint_format import load_checkpoint, stamp
from lightning_seg.errors import UserError
from lightning_seg.trust import UntrustedCheckpointError, build

from .conftest import compose_config, tiny_synthetic_overrides
from .test_hostile_data import peak_bar_gib, run_measured

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One epoch of the tiny synthetic task: the checkpoint every hostile variant is made from."""
    tmp = tmp_path_factory.mktemp("trained")
    training.train(compose_config(tmp, [*tiny_synthetic_overrides(), "trainer.max_epochs=1"]))
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    return {"ckpt": ckpt, "checkpoint": torch.load(ckpt, weights_only=True), "data": tmp / "data"}


class Canary:
    """What a payload would leave behind: `made` written, or `kept` (a folder) deleted."""

    def __init__(self, tmp: Path) -> None:
        self.made, self.kept, self.script = tmp / "canary", tmp / "keep", tmp / "payload.py"
        self.kept.mkdir(parents=True)
        (self.kept / "file").write_text("still here")
        self.script.write_text(f"open({str(self.made)!r}, 'w').close()\n")

    def untouched(self) -> bool:
        return not self.made.exists() and (self.kept / "file").is_file()


class Touch:  # unpickled, runs `touch`: the pickle.loads and raw-pickle payloads
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


PAYLOADS = {
    "os.system": lambda c: {"_target_": "os.system", "_args_": [f"touch {c.made}"]},
    "subprocess.run": lambda c: {"_target_": "subprocess.run", "_args_": [["touch", str(c.made)]]},
    "shutil.rmtree": lambda c: {"_target_": "shutil.rmtree", "_args_": [str(c.kept)]},
    "builtins.exec": lambda c: {"_target_": "builtins.exec", "_args_": [c.script.read_text()]},
    # bytes are no config value: a nested gadget decodes them
    "pickle.loads": lambda c: {
        "_target_": "pickle.loads",
        "_args_": [
            {
                "_target_": "base64.b64decode",
                "_args_": [base64.b64encode(pickle.dumps(Touch(c.made))).decode()],
            }
        ],
    },
    "runpy.run_path": lambda c: {"_target_": "runpy.run_path", "_args_": [str(c.script)]},
}


# where the payload goes; each also replaces the copy `module` holds (what validate rebuilds); the keys set
def at_model(run: dict, payload: dict) -> list[str]:
    run["model"] = run["module"]["net"] = payload
    return ["model._target_", "module.net._target_"]


def in_network_args(run: dict, payload: dict) -> list[str]:
    run["model"]["width"] = run["module"]["net"]["width"] = payload
    return ["model.width._target_", "module.net.width._target_"]


def in_loss(run: dict, payload: dict) -> list[str]:
    run["loss"] = run["module"]["loss"] = payload
    return ["module.loss._target_", "loss._target_"]


def in_optimizer(run: dict, payload: dict) -> list[str]:
    run["optimizer"]["optimizer"] = run["module"]["optimizer"] = {**payload, "_partial_": True}
    return ["module.optimizer._target_", "optimizer.optimizer._target_"]


def in_augmentation(run: dict, payload: dict) -> list[str]:
    run["data"]["augmentation"] = [payload]
    return ["data.augmentation[0]._target_"]


PLACES = [at_model, in_network_args, in_loss, in_optimizer, in_augmentation]


def hostile_copy(trained: dict, tmp: Path, edit) -> Path:
    checkpoint = copy.deepcopy(trained["checkpoint"])
    edit(checkpoint["hyper_parameters"]["run_config"])
    torch.save(checkpoint, path := tmp / "evil.ckpt")
    return path


def commands(trained: dict, ckpt: Path, tmp: Path) -> dict:
    """Each command that loads a checkpoint: (its main, its command line)."""
    image = next((trained["data"] / "Task00_Synthetic" / "imagesTr").glob("*.nii.gz"))
    paths = [f"paths.{k}_dir={tmp / k}" for k in ("data", "log", "cache")]
    return {
        "predict": (predict.main, [f"ckpt_path={ckpt}", f"input={image}", f"output={tmp / 'predicted'}"]),
        "evaluate": (
            evaluate.main,
            [
                f"ckpt_path={ckpt}",
                f"task_dir={trained['data'] / 'Task00_Synthetic'}",
                "split=val",
                f"output={tmp / 'eval'}",
            ],
        ),
        "validate": (validate.main, [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp / 'validated'}", *paths]),
        "train": (
            training.main,
            [*tiny_synthetic_overrides(), f"ckpt_path={ckpt}", f"hydra.run.dir={tmp / 'fork'}", *paths],
        ),
    }


def run_in_process(main, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """`main` as its console command runs it: (exit code, stdout and stderr)."""
    monkeypatch.setattr(sys, "argv", ["lightning-seg", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_refused(code: int, output: str, ckpt: Path, keys: list[str]) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, output
    assert "Traceback" not in output, output
    assert str(ckpt) in errors[0] and any(key in errors[0] for key in keys), output


# hydra-core 1.3.8's block-list refuses every payload here; shutil.rmtree its users may allow again. Off,
# as in hydra-core < 1.3.4: the refusal is this project's
HYDRA_BLOCKLIST_OFF = "shutil.rmtree"


def call(payload):
    """What a payload does when something calls it, Hydra or not (nested `_target_`s first)."""
    args = [call(a) if isinstance(a, dict) else a for a in payload["_args_"]]
    return pydoc.locate(payload["_target_"])(*args)


@pytest.mark.parametrize("target", PAYLOADS)
def test_every_payload_is_live(tmp_path, monkeypatch, target):
    canary = Canary(tmp_path)
    call(PAYLOADS[target](canary))
    assert not canary.untouched()
    monkeypatch.setenv("HYDRA_INSTANTIATE_ALLOWLIST_OVERRIDE", HYDRA_BLOCKLIST_OFF)
    if target in HYDRA_BLOCKLIST_OFF:  # and Hydra runs it once its block-list is off
        instantiate(PAYLOADS[target](Canary(tmp_path / "again")))
        assert not (tmp_path / "again" / "keep").exists()


@pytest.mark.parametrize("place", PLACES, ids=lambda p: p.__name__)
@pytest.mark.parametrize("target", PAYLOADS)
def test_a_checkpoint_naming_code_is_refused_by_every_command(
    trained, tmp_path, capsys, monkeypatch, target, place
):
    monkeypatch.setenv("HYDRA_INSTANTIATE_ALLOWLIST_OVERRIDE", HYDRA_BLOCKLIST_OFF)  # as hydra-core < 1.3.4
    canary = Canary(tmp_path)
    keys = []
    ckpt = hostile_copy(trained, tmp_path, lambda run: keys.extend(place(run, PAYLOADS[target](canary))))
    for name, (main, argv) in commands(trained, ckpt, tmp_path).items():
        code, output = run_in_process(main, argv, capsys, monkeypatch)
        assert_refused(code, output, ckpt, keys)
        assert canary.untouched(), name


def test_the_command_lines_refuse_it_as_a_user_runs_them(trained, tmp_path):
    canary = Canary(tmp_path)
    keys = []
    ckpt = hostile_copy(
        trained, tmp_path, lambda run: keys.extend(at_model(run, PAYLOADS["os.system"](canary)))
    )
    modules = {"predict": "lightning_seg.predict", "evaluate": "lightning_seg.evaluate"}
    modules |= {"validate": "lightning_seg.validate", "train": "lightning_seg.training"}
    for name, (_, argv) in commands(trained, ckpt, tmp_path).items():
        result = subprocess.run(
            [sys.executable, "-m", modules[name], *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert_refused(result.returncode, result.stdout + result.stderr, ckpt, keys)
        assert canary.untouched(), name


def test_a_pickle_that_runs_code_is_refused_by_every_command(trained, tmp_path, capsys, monkeypatch):
    canary = Canary(tmp_path)
    ckpt = hostile_copy(trained, tmp_path, lambda run: run.update(note=Touch(canary.made)))
    for name, (main, argv) in commands(trained, ckpt, tmp_path).items():
        code, output = run_in_process(main, argv, capsys, monkeypatch)
        assert_refused(code, output, ckpt, ["pickled objects"])
        assert canary.untouched(), name


def test_an_interpolation_is_refused_it_could_build_a_target(trained, tmp_path):
    canary = Canary(tmp_path)
    gadget = "${oc.create:'{_target_: os.system, _args_: [touch " + str(canary.made) + "]}'}"
    ckpt = hostile_copy(trained, tmp_path, lambda run: run["model"].update(width=gadget))
    with pytest.raises(UntrustedCheckpointError, match=r"model\.width = .* is an interpolation"):
        load_checkpoint(ckpt)
    assert canary.untouched()


def test_settings_promising_a_network_its_weights_do_not_hold_are_refused_unbuilt(trained, tmp_path):
    """width 4096: 94e9 parameters (376 GB) if built; the meta-device build compares shapes first."""

    def wide(run: dict) -> None:
        run["model"]["width"] = run["module"]["net"]["width"] = 4096

    ckpt = hostile_copy(trained, tmp_path, wide)
    for name, (_, argv) in commands(trained, ckpt, tmp_path).items():
        if name != "train":  # training builds its network from the user's config, not the file's
            result, seconds, peak_gib = run_measured(f"lightning_seg.{name}", *argv)
            output = result.stdout + result.stderr
            assert_refused(result.returncode, output, ckpt, ["model settings build", "module settings build"])
            assert peak_gib < peak_bar_gib() and seconds < 60, (name, peak_gib, seconds)


@pytest.mark.parametrize("key", ["task", "paths", "anything"])
def test_a_target_anywhere_but_trainer_callbacks_logger_is_refused(trained, tmp_path, key):
    payload = PAYLOADS["os.system"](Canary(tmp_path))
    ckpt = hostile_copy(trained, tmp_path, lambda run: run.setdefault(key, {}).update(x=payload))
    with pytest.raises(UntrustedCheckpointError, match=rf"{key}\.x\._target_ = 'os.system'"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ck: ck["hyper_parameters"].update(run_config="model"), "its run_config is a str"),
        (lambda ck: ck["hyper_parameters"]["run_config"].update(model="os.system"), "has no model settings"),
        (
            lambda ck: ck["hyper_parameters"]["run_config"]["loss"].update(_target_=["os.system"]),
            "loss._target_",
        ),
        (
            lambda ck: ck["hyper_parameters"]["run_config"]["model"].update(_target_="os.system "),
            "'os.system '",
        ),
    ],
)
def test_a_malformed_run_config_is_named_not_run(trained, tmp_path, edit, message):
    checkpoint = copy.deepcopy(trained["checkpoint"])
    edit(checkpoint)
    torch.save(checkpoint, path := tmp_path / "odd.ckpt")
    with pytest.raises(UserError, match=re.escape(message)):
        load_checkpoint(path)


def test_code_the_user_names_on_the_command_line_is_trusted(trained, tmp_path, capsys, monkeypatch):
    """A network the project does not ship (MONAI's BasicUNet named directly) predicts once the user
    trusts it, and only then."""
    net = "monai.networks.nets.BasicUNet"
    shape = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 4, 8, 16, 32, 4]}
    ckpt = hostile_copy(trained, tmp_path, lambda run: run.update(model={"_target_": net, **shape}))
    main, argv = commands(trained, ckpt, tmp_path)["predict"]
    assert_refused(*run_in_process(main, argv, capsys, monkeypatch), ckpt, ["model._target_"])
    code, output = run_in_process(main, [*argv, f"trusted_targets=[{net}]"], capsys, monkeypatch)
    assert code == 0 and len(list((tmp_path / "predicted").glob("*.nii.gz"))) == 1, output


def test_the_untouched_checkpoint_passes_every_command_but_training(trained, tmp_path, capsys, monkeypatch):
    """The refusals above are the payload's doing: the same commands accept the checkpoint it came from
    (training from it: test_resume.py's forks)."""
    for name, (main, argv) in commands(trained, trained["ckpt"], tmp_path).items():
        if name != "train":
            code, output = run_in_process(main, argv, capsys, monkeypatch)
            assert code in (0, None) and "error:" not in output, f"{name}: {output}"


@pytest.mark.parametrize(
    "group, choice",
    [("model", m) for m in ("basic_unet", "monai_unet", "dynunet")]
    + [("loss", "dice"), ("loss", "dice_ce"), ("optimizer", "adam"), ("optimizer", "sgd_poly")]
    + [("recipe", "reference_talk"), ("recipe", "nnunet")],
)
def test_every_shipped_network_loss_optimizer_and_recipe_round_trips(tmp_path, group, choice):
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), f"{group}={choice}"])
    module = instantiate(cfg.module)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": {"run_config": run_config}}
    stamp(checkpoint)
    torch.save(checkpoint, path := tmp_path / "shipped.ckpt")
    loaded, run = load_checkpoint(path)
    build(run["module"], loaded["state_dict"], path, "module").load_state_dict(loaded["state_dict"])
    net_state = {k.removeprefix("net."): v for k, v in loaded["state_dict"].items() if k.startswith("net.")}
    build(run["model"], net_state, path, "model").load_state_dict(net_state)
    assert len(instantiate(run["data"]).augmentation) == len(cfg.data.augmentation)
