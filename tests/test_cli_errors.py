"""The CLI's error line: any SndError text prints as is (paths are not rich markup), and the file-system
refusals a user fixes (a file where a folder should be, no permission, a full disk) are one line with a
fix and exit 2, while other OSErrors keep their traceback."""
from __future__ import annotations

import errno

import pytest

from snd.errors import SndError, user_os_error
from tests._cli import run_cli


def test_an_error_naming_an_absolute_path_prints(monkeypatch, capsys):
    """SndError appends its path in brackets; "[/data/store/scene]" once read as a rich closing tag and
    crashed the error print with a MarkupError traceback (a corrupted store chunk in `snd distill`)."""
    import snd.export

    def damaged(*a, **k):
        raise SndError("corrupted scaffold cache: scene 'a' pair 1", path="/data/store/a", hint="rerun [it]")

    monkeypatch.setattr(snd.export, "export_run", damaged)
    assert run_cli(["export", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert "corrupted scaffold cache: scene 'a' pair 1 [/data/store/a]" in err and "fix: rerun [it]" in err


def test_out_path_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert run_cli(["data", "synth", "--out", str(out), "--scenes", "1", "--frames", "2", "--height", "28",
                    "--width", "42", "--workers", "1"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert f"Not a directory: {out}" in err and "a file stands where snd needs a folder" in err
    assert "Traceback" not in err and out.read_text() == "mine"


def test_only_user_fixable_os_errors_become_messages():
    full = user_os_error(OSError(errno.ENOSPC, "No space left on device", "/cache/a/c/0"))
    assert isinstance(full, SndError) and full.path is not None and "free disk space" in str(full)
    assert "No space left on device: /cache/a/c/0" in str(full)
    assert user_os_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")) is None
    assert user_os_error(OSError("no errno")) is None


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.EISDIR])
def test_permission_and_kind_refusals_carry_a_fix(code):
    e = user_os_error(OSError(code, "refused", "/x/y"))
    assert e is not None and e.hint and "/x/y" in str(e)


def test_a_missing_model_path_is_not_found_not_an_unknown_backbone(tmp_path):
    """`snd eval --model runs/typo` used to say "unknown backbone 'runs/typo'" and list backbone names."""
    from snd.eval.features import load_eval_backbone

    for missing in (tmp_path / "runs" / "typo", "dinov2_vits14_pretrain.pth"):
        with pytest.raises(SndError, match="backbone file or folder not found"):
            load_eval_backbone(str(missing))
    with pytest.raises(SndError, match="unknown backbone 'dinov2_vitz14'"):
        load_eval_backbone("dinov2_vitz14")


def test_eval_with_a_missing_model_writes_nothing(synth_root, tmp_path):
    """The backbones load before anything is written (their patch sets the default input size), so a typo in
    --model leaves no output folder, config.json or cache lock behind."""
    from snd.pipeline.config import EvalConfig
    from snd.stages import evaluate

    with pytest.raises(SndError, match="not found"):
        evaluate.run(EvalConfig(model=str(tmp_path / "typo"), data_root=synth_root, datasets=["synth"],
                                out=tmp_path / "out", device="cpu"), tasks=["corr"])
    assert not (tmp_path / "out").exists()


def test_a_file_or_folder_of_the_wrong_kind_is_named_as_such(tmp_path, capsys):
    """`--data notes.txt` said "dataset root does not exist" and `snd features DIR` "image not found"."""
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    assert run_cli(["precompute", "--data", str(notes), "--out", str(tmp_path / "c"), "--device", "cpu"]) == 2
    assert "dataset root is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert run_cli(["features", str(tmp_path), "--model", "snd_test_vit_patch14", "--out", str(tmp_path / "f")]) == 2
    assert "a folder, not an image" in capsys.readouterr().err
