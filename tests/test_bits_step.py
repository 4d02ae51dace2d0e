"""benchmarks.bits_step refuses bad arguments before loading anything."""

import pytest

from benchmarks import bits_step


@pytest.mark.parametrize("argv, match", [
    (["--bits", "4"], r"two or more distinct widths from \[2, 3, 4, 8\], got \[4\]"),
    (["--bits", "4", "5"], r"got \[4, 5\]"),
    (["--bits", "4", "4"], r"got \[4, 4\]"),
    (["--group-size", "48"], r"--group-size must be one of \[32, 64, 128\], got 48"),
    (["--rounds", "0"], "--rounds and --threads must be >= 1"),
    (["--threads", "0"], "--rounds and --threads must be >= 1"),
])
def test_bad_arguments_exit_with_a_message(argv, match, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr("csd_compile.models.loader.load_model", no_model)
    with pytest.raises(SystemExit, match=match):
        bits_step.main(argv)
