from runs import zoscale


def test_bad_arguments_exit_2_with_a_one_line_error(cli):
    for args, message in ((["train", "--steps", "0"], "must be a positive integer"),
                          (["train", "--resume", "/nonexistent"], "not a run directory"),
                          (["train", "optim.lr"], "unrecognized arguments: optim.lr"),
                          (["bench", "quadratic", "--dim", "-3", "--out", "x"], "must be a positive integer"),
                          (["frobnicate"], "invalid choice")):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_help_lists_the_commands():
    done = zoscale("--help")
    assert done.returncode == 0
    for command in ("train", "export", "replay", "bench"):
        assert command in done.stdout


def test_version_and_the_train_help_that_names_the_config_sections():
    from importlib.metadata import version

    assert zoscale("--version").stdout.strip() == f"zoscale {version('zoscale')}"
    helped = " ".join(zoscale("train", "--help").stdout.split())
    assert "model.*" in helped and "data.*" in helped and "optim.*" in helped and "docs/training.md" in helped
