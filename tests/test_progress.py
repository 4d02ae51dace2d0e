"""CompileProgress: what is being compiled and for how long, while the backend works."""

import io

import torch

from csd_compile.progress import CompileProgress, note
from tests.conftest import make_tiny_llama


def test_progress_reports_each_graph_and_stage_of_a_real_compile():
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="csd", options={"bits": 4, "group_size": 32}, fullgraph=True)
    out = io.StringIO()  # not a terminal: one line per stage
    with torch.no_grad(), CompileProgress("the tiny model", file=out, interval=60) as prog:
        compiled(ids)
    text = out.getvalue()
    assert "compiling the tiny model: tracing with Dynamo" in text
    assert "graph 1:" in text and "pass quantize_linear" in text
    assert "(14 quantized linears), Inductor" in text  # 2 layers x 7 linears; the LM head stays bf16
    assert text.rstrip().splitlines()[-1].startswith("[csd-compile] compiled the tiny model in ")
    assert prog.graphs == 1 and prog.seconds > 0


def test_note_outside_a_progress_block_does_nothing(capsys):
    note("nothing listens", new_graph=True)
    assert capsys.readouterr() == ("", "")


def test_a_failed_compile_says_so():
    out = io.StringIO()
    try:
        with CompileProgress("x", file=out):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert "stopped compiling x in" in out.getvalue()
