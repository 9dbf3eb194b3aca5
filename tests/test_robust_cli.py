"""Bad CLI invocations (issue 9): one line ``lorarar <command>: error: ...`` and exit status 1."""

import pytest
from lorarar.cli import main


@pytest.mark.parametrize(
    "argv,command",
    [
        ([], "lorarar"),
        (["bogus"], "lorarar"),
        (["merge"], "lorarar merge"),
        (["merge", "--content", "a", "--style", "b", "--out", "c", "--dtype", "fp8"], "lorarar merge"),
        (["generate", "--steps", "x"], "lorarar generate"),
        (["demo", "--steps", "-1"], "lorarar demo"),
        (["demo", "--no-such-flag"], "lorarar"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(argv, command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1, err
    assert err.startswith(f"{command}: error: ") and err.count("\n") == 1, err


def test_a_missing_file_is_one_line_and_exit_1(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--content", str(tmp_path / "no.safetensors"), "--style", str(tmp_path / "x.safetensors"),
                 "--out", str(out)]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("lorarar merge: error:") and err.count("\n") == 1 and not out.exists()
