"""The ``csd-tp2`` bench row: registered, only when asked, compared against csd-int4 (same configuration,
one process)."""

from csd_compile.bench import harness


def test_csd_tp2_row_is_opt_in_and_paired_with_its_single_process_config():
    from csd_compile.bench import systems  # noqa: F401  (registers the systems)

    row = harness.SYSTEMS["csd-tp2"]
    assert row.default is False
    assert row.plain == "csd-int4" and "csd-int4" in harness.SYSTEMS
    assert row.precision == harness.SYSTEMS["csd-int4"].precision


def test_gpu_check_script_plans_nccl_against_one_process(capsys):
    from benchmarks import tp_gpu_check

    assert tp_gpu_check.main(["--dry-run", "--world", "4"]) == 0
    out = capsys.readouterr().out
    assert "--nproc-per-node 4" in out and "--tp --tp-backend nccl" in out and "one-process-cpu:" in out
