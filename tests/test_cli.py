import re

import pytest

from csd_compile.cli import main


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["generate", "--prompt", ""], "--prompt is empty"),
        (["generate", "--prompt", "   "], "--prompt is empty"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "must be >= 1, got -3"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "must be >= 1, got 0"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "ten"], "expected a positive integer, got 'ten'"),
        (["generate", "--prompt", "hi", "--dtype", "fp16"], "invalid choice: 'fp16'"),
        (["generate", "--prompt", "hi", "--model", "/no/such/model"], "'/no/such/model' is neither an embedded model"),
        (["generate", "--prompt", "hi", "-o", "bits=5"], r"'bits'=5 is not supported"),
        (["generate", "--prompt", "hi", "-o", "colour=blue"], "unknown csd option 'colour'"),
        (["generate", "--prompt", "hi", "-o", "bits"], "expected KEY=VALUE"),
        (["generate", "--prompt", "hi", "--acceptance", "csd"], "--acceptance csd needs a draft"),
        (["generate", "--prompt", "hi", "--draft", "medusa"], "invalid choice: 'medusa'"),
        (["generate", "--prompt", "hi", "--draft", "self", "--acceptance", "csd", "--memory", "/no/mem.pt"], "--memory '/no/mem.pt' is not a file"),
        (["generate", "--prompt", "hi", "--tau", "0"], r"--tau 0.0 must be in \(0, 1\]"),
        (["generate", "--prompt", "hi", "--tau", "1.5"], r"--tau 1.5 must be in \(0, 1\]"),
        (["generate", "--prompt", "hi", "--draft-bits", "5"], "invalid choice: 5"),
        (["generate", "--prompt", "hi", "--chat-template", "/no/template.jinja"], "--chat-template: chat template '/no/template.jinja' is neither one of"),
        (["generate", "--prompt", "hi", "--draft", "ngram", "--num-draft-tokens", "100"], "must be <= 64, got 100"),
        (["generate", "--prompt", "hi", "--draft", "self", "--acceptance", "csd", "--lambda", "-1"], "must be a number >= 0 or inf, got '-1'"),
        (["generate", "--prompt", "hi", "--draft", "self", "--acceptance", "csd", "--lambda", "six"], "expected a number >= 0 or inf, got 'six'"),
        (["generate", "--prompt", "hi", "--draft", "self", "--tau", "0.3"], r"--tau: only with --acceptance csd \(got --acceptance exact\)"),
        (["generate", "--prompt", "hi", "--draft", "ngram", "--lambda", "2", "--tau", "0.5"], "--tau, --lambda: only with --acceptance csd"),
        (["generate", "--prompt", "hi", "--draft", "self", "--acceptance", "csd", "-o", "tau=0.3"], r"-o tau=\.\.\. is not a backend option of generate; use --tau"),
        (["generate", "--prompt", "hi", "-o", "lambda=2"], "use --lambda"),
        (["generate", "--prompt", "hi", "-o", "acceptance=csd"], "use --acceptance"),
        (["calibrate", "--out", "/no/such/dir/t.json"], "folder '/no/such/dir' does not exist"),
        (["calibrate", "--out", "t.json", "--data", "/no/text.txt"], "--data '/no/text.txt' is neither a text file nor one of"),
        (["calibrate", "--out", "t.json", "--model", "/no/model"], "'/no/model' is neither an embedded model"),
        (["calibrate", "--ocm", "--out", "m.ocm", "--draft-bits", "5"], "invalid choice: 5"),
        (["bench", "--systems", "hf-bf16,warp-drive"], r"unknown system\(s\) \['warp-drive'\]"),
        (["bench", "--prompts", "0"], "must be >= 1"),
        (["bench", "--bandwidth-mib", "0"], "must be >= 1"),
        (["profile", "--systems", "hf-bf16,warp-drive"], r"unknown system\(s\) \['warp-drive'\]"),
        (["profile", "--steps", "0"], "must be >= 1"),
        (["profile", "--model", "/no/model"], "'/no/model' is neither an embedded model"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(argv, pattern, capsys, monkeypatch):
    import csd_compile.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded a model despite bad input"))
    code, err = _run_cli(argv, capsys)
    assert code == 2
    assert re.search(pattern, err), err


def test_file_that_is_not_a_model_is_reported(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    code, err = _run_cli(["generate", "--prompt", "hi", "--model", str(f), "--no-compile"], capsys)
    assert code == 2 and "not a .gguf model" in err


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("hf-bf16", "hf-fp32", "hf-inductor-static", "hf-prompt-lookup", "csd", "llama.cpp"):
        assert name in out


def test_generate_csd_without_memory_runs(capsys):
    """`generate --acceptance csd` on the embedded model: no --memory needed, the stats line names
    the settings (the defaults, or --tau / --lambda)."""
    argv = ["generate", "--prompt", "def add(a, b):", "--draft", "ngram", "--acceptance", "csd", "--no-compile",
            "--max-new-tokens", "8"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "starts empty and learns online" in err and "acceptance csd (tau 0.3, lambda 6)" in err
    assert main(argv + ["--tau", "0.01", "--lambda", "inf"]) == 0
    assert "acceptance csd (tau 0.01, lambda inf)" in capsys.readouterr().err


def test_calibrate_ocm_seeds_a_loadable_memory(tmp_path, capsys):
    """`calibrate --ocm` on the embedded model: a memory file that loads, carries the tokenizer's
    fingerprint and holds every recorded pair (a big table: nothing evicted)."""
    from csd_compile import load_model
    from csd_compile.speculative.memory import CorrectionMemory, tokenizer_fingerprint

    out = tmp_path / "m.ocm"
    assert main(["calibrate", "--ocm", "--prompts", "2", "--max-new-tokens", "12", "--draft-bits", "2",
                 "--out", str(out)]) == 0
    recorded = int(re.search(r"\((\d+) rejection pairs\)", capsys.readouterr().err).group(1))
    _, tok = load_model("smollm2-135m-instruct", dtype="bf16")
    memory = CorrectionMemory.load(out, tok)  # checks the fingerprint
    assert memory.fingerprint == tokenizer_fingerprint(tok)
    assert recorded > 0 and int(memory.counts.sum()) == recorded


def test_prompt_and_max_new_tokens_beyond_the_context_fail_before_compiling(capsys):
    """A request the model's context cannot hold is an error before loading (the context is read from
    the model's files), not a multi-minute compile or a huge cache allocation."""
    from csd_compile.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", "--max-new-tokens", "1000000000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens 1000000000 does not fit the model's context of 8192 tokens" in err
    assert "loading" not in err and "compiling" not in err


def test_dynamic_bits_with_a_bad_table_fail_before_loading_or_compiling(tmp_path, capsys):
    from csd_compile.cli import main

    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x00\xffnot json")
    for table, phrase in ((tmp_path / "missing.json", "no such file"), (junk, "junk.json")):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "--prompt", "hi", "-o", "bits=dynamic", "-o", f"calibration={table}"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert phrase in err and "loading" not in err


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00junk", bytes(range(256)) * 3])
def test_a_damaged_gguf_is_one_line_and_exit_2(tmp_path, capsys, content):
    from csd_compile.cli import main

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    try:
        code = main(["generate", "--prompt", "hi", "--model", str(bad)])
    except SystemExit as e:  # the errors load_model names itself exit through argparse's path
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("csd-compile generate: error")]
    assert len(lines) == 1 and "Traceback" not in err, err


def test_unexpected_errors_and_ctrl_c_at_the_cli_boundary(monkeypatch, capsys):
    import csd_compile.cli as cli

    def boom(args, parser):
        raise RuntimeError("deep inside\na library")

    monkeypatch.setattr(cli, "cmd_calibrate", boom)
    assert cli.main(["calibrate", "--out", "t.json"]) == 2
    err = capsys.readouterr().err
    assert "csd-compile calibrate: error: RuntimeError: deep inside a library (--debug shows the traceback)" in err
    with pytest.raises(RuntimeError, match="deep inside"):
        cli.main(["calibrate", "--out", "t.json", "--debug"])

    def interrupted(args, parser):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_calibrate", interrupted)
    assert cli.main(["calibrate", "--out", "t.json"]) == 130
    assert capsys.readouterr().err.strip() == "csd-compile calibrate: interrupted"
