"""The command line refuses bad input with one line and exit 2, before the model loads wherever the
input can be judged without it (text, lengths against the context read from the model's files,
tables, output paths), and right after the load, before any compile, where it needs the tokenizer
or the weights."""

import json
import re

import pytest

import csd_compile
import csd_compile.models
import csd_compile.models.loader as loader
import csd_compile.progress
from csd_compile.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*a, **k):
        pytest.fail("loaded a model despite bad input")

    for owner in (csd_compile, csd_compile.models, loader):
        monkeypatch.setattr(owner, "load_model", refuse)


def _table(path, *, fingerprint="0123456789abcdef", numel=4096):
    layers = [{"name": f"l{i}", "numel": numel, "kl": [0.5, 0.2, 0.1, 0.01]} for i in range(3)]
    path.write_text(json.dumps({"format": "csd-precision-table", "version": 1, "fingerprint": fingerprint,
                                "ladder": [2, 3, 4, 8], "layers": layers, "entropy_quantiles": [0.0, 1.0, 2.0],
                                "settings": {"group_size": 64}}))
    return str(path)


def _files(tmp_path):
    """Damaged inputs, each a file under ``tmp_path``: name -> path."""
    f = {}
    (tmp_path / "random.bin").write_bytes(b"\xff\xfe" + bytes(range(256)) * 8)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"  \n\t\n")
    (tmp_path / "control.txt").write_bytes(b"ab\x00\x01\x02\x03\x04cd")
    (tmp_path / "corrupt.json").write_text('{"format": "csd-precision-table"')
    (tmp_path / "other.json").write_text('{"answer": 42}')
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    for p in tmp_path.iterdir():
        f[p.name] = str(p)
    f["numel0.json"] = _table(tmp_path / "numel0.json", numel=0)
    f["valid.json"] = _table(tmp_path / "valid.json")
    return f


BIG = "1000000000"
CONTEXT = "does not fit the model's context of 8192 tokens"
# (case id, argv with {name} placeholders for _files, phrase of the one-line error)
CASES = [
    ("prompt not UTF-8", ["generate", "--prompt", "caf\udce9 au lait"], r"--prompt is not valid UTF-8 text \(byte 0xe9"),
    ("max-new-tokens 1e9", ["generate", "--prompt", "hi", "--max-new-tokens", BIG], f"--max-new-tokens {BIG} {CONTEXT}"),
    ("max-new-tokens 1e9, ngram", ["generate", "--prompt", "hi", "--draft", "ngram", "--max-new-tokens", BIG], CONTEXT),
    ("max-new-tokens 1e9, self", ["generate", "--prompt", "hi", "--draft", "self", "--max-new-tokens", BIG], CONTEXT),
    ("max-new-tokens = context", ["generate", "--prompt", "hi", "--max-new-tokens", "8192"], CONTEXT),
    ("-o with --no-compile", ["generate", "--prompt", "hi", "--no-compile", "-o", "bits=4"], "do nothing with --no-compile"),
    ("dynamic, no table", ["generate", "--prompt", "hi", "-o", "bits=dynamic"], "needs 'calibration'"),
    ("dynamic, missing table", ["generate", "--prompt", "hi", "-o", "bits=dynamic", "-o", "calibration=/no/t.json"],
     "'/no/t.json': no such file"),
    ("dynamic, corrupt table", ["generate", "--prompt", "hi", "-o", "bits=dynamic", "-o", "calibration={corrupt.json}"],
     r"corrupt.json' is corrupt \(not JSON"),
    ("dynamic, random bytes", ["generate", "--prompt", "hi", "-o", "bits=dynamic", "-o", "calibration={random.bin}"],
     r"random.bin' is corrupt \(not JSON"),
    ("dynamic, foreign JSON", ["generate", "--prompt", "hi", "-o", "bits=dynamic", "-o", "calibration={other.json}"],
     "other.json' is not a csd precision table"),
    ("dynamic, numel 0", ["generate", "--prompt", "hi", "-o", "bits=dynamic", "-o", "calibration={numel0.json}"],
     "numel of 'l0' must be a positive int"),
    ("dynamic, other group size", ["generate", "--prompt", "hi", "-o", "bits=dynamic", "-o", "calibration={valid.json}",
                                   "-o", "group_size=32"], "calibrated with group_size=64, the options ask for group_size=32"),
    ("calibrate, random bytes", ["calibrate", "--out", "{folder}/t.json", "--data", "{random.bin}"],
     r"--data: calibration text '.*random.bin' is not UTF-8 text \(byte 0xff at offset 0\)"),
    ("calibrate, empty file", ["calibrate", "--out", "{folder}/t.json", "--data", "{empty.txt}"], "empty.txt' holds no usable text"),
    ("calibrate, blank file", ["calibrate", "--out", "{folder}/t.json", "--data", "{blank.txt}"], "blank.txt' holds no usable text"),
    ("calibrate, control bytes", ["calibrate", "--out", "{folder}/t.json", "--data", "{control.txt}"],
     r"control.txt' looks binary \(5 control characters"),
    ("calibrate, out is a folder", ["calibrate", "--out", "{folder}"], "folder' is a folder; give a file name"),
    ("calibrate --ocm, out is a folder", ["calibrate", "--ocm", "--out", "{folder}"], "is a folder"),
    ("calibrate --ocm with --data", ["calibrate", "--ocm", "--out", "{folder}/m.ocm", "--data", "britannica"],
     "--data: only without --ocm"),
    ("calibrate --ocm, 1e9 tokens", ["calibrate", "--ocm", "--out", "{folder}/m.ocm", "--max-new-tokens", BIG], CONTEXT),
    ("calibrate --ocm, 1e6 prompts", ["calibrate", "--ocm", "--out", "{folder}/m.ocm", "--prompts", "1000000"],
     r"--prompts 1000000: only \d+ held-out calibration prompts ship"),
    ("bench, 1e9 tokens", ["bench", "--max-new-tokens", BIG, "--out", "{folder}"], CONTEXT),
    ("bench, 1e6 prompts", ["bench", "--prompts", "1000000", "--out", "{folder}"], r"--prompts 1000000: at most 160 \("),
    ("bench, 161 prompts", ["bench", "--prompts", "161", "--out", "{folder}"], r"--prompts 161: at most 160 \("),
    ("bench, 1e9 MiB bandwidth tensor", ["bench", "--bandwidth-mib", BIG, "--out", "{folder}"],
     f"--bandwidth-mib {BIG}: a bandwidth measurement of {BIG} MiB is more than half the available memory"),
    ("bench, out is a file", ["bench", "--out", "{afile}"], "afile' is a file; it must be a folder"),
    ("profile, 1e9 steps", ["profile", "--steps", BIG, "--out", "{folder}"], f"--steps {BIG} {CONTEXT}"),
    ("profile, out is a file", ["profile", "--out", "{afile}"], "afile' is a file; it must be a folder"),
]


@pytest.mark.parametrize("argv, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_line_exit_2_before_loading(tmp_path, capsys, no_load, argv, phrase):
    files = _files(tmp_path)
    argv = [re.sub(r"\{([^}]+)\}", lambda m: files[m.group(1)], a) for a in argv]
    code, err = _run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert re.search(phrase, err), err


def test_damaged_gguf_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """A real GGUF cut short keeps a valid header (its context is still read) but fails to convert:
    one line naming the file, exit 2, and nothing left in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gguf = loader.EMBEDDED_MODELS["smollm2-135m-instruct"].gguf_path()
    cut = tmp_path / "cut.gguf"
    with open(gguf, "rb") as f:
        cut.write_bytes(f.read(200_000))
    assert loader.context_length(cut) == 8192
    code, err = _run(["generate", "--prompt", "hi", "--model", str(cut), "--no-compile"], capsys)
    assert code == 2
    # the GGUF header reader or the conversion names the file and what is wrong with it
    assert re.search(r"error: .*cut\.gguf(: .*(past the end|truncated)| could not be read as a model)", err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2, err  # the loading line and the error
    folder = tmp_path / "cache" / "csd-compile"
    assert not folder.exists() or not any(folder.iterdir())


@pytest.mark.parametrize("case", ["prompt longer than the context", "table of another model"])
def test_input_judged_by_the_loaded_model_fails_before_compiling(tmp_path, capsys, monkeypatch, case):
    def refuse(*a, **k):
        pytest.fail("started compiling despite bad input")

    monkeypatch.setattr(csd_compile.progress, "CompileProgress", refuse)
    if case == "prompt longer than the context":
        argv, phrase = ["--prompt", "word " * 9000, "--max-new-tokens", "4"], \
            r"the prompt \(9001 tokens\) \+ --max-new-tokens 4 exceeds the model's context of 8192"
    else:
        table = _table(tmp_path / "tiny.json")
        argv, phrase = ["--prompt", "hi", "-o", "bits=dynamic", "-o", f"calibration={table}"], \
            "-o calibration=.*tiny.json: precision table was calibrated for another model"
    code, err = _run(["generate", *argv], capsys)
    assert code == 2
    assert re.search(phrase, err), err
    assert "Traceback" not in err
