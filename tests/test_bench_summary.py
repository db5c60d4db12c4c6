"""benchmarks/summary.py: the issue's ratios read from result files, the main ones or
another machine's (`--tag`), a missing file or key said so."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _summary():
    spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "benchmarks" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_reads_the_tagged_files_and_says_what_is_missing(tmp_path, capsys):
    summary = _summary()
    (tmp_path / "decoder__epyc.json").write_text(json.dumps(
        {"threads": 2, "speedup_vs_tutorial_median": {"variable": 2.6},
         "ratio_of_gemm_peak": {"variable/caption_lib": 0.43}}))
    (tmp_path / "beam.json").write_text(json.dumps({"threads": 1, "images_per_s": {"batched": 50.0}}))
    tagged = summary.lines(tmp_path, "epyc")
    assert len(tagged) == len(summary.ROWS)
    assert ("decoder training step vs tutorial-style (lengths vary, median): 2.6x "
            "(decoder__epyc.json, 2 threads)") in tagged
    assert ("decoder training step, fp32: share of the fp32 GEMM peak: 43 % "
            "(decoder__epyc.json, 2 threads)") in tagged
    assert any(line.endswith("not in decoder__epyc.json (written before it recorded "
                             "ms_per_step_median.variable/caption_lib)") for line in tagged)
    assert "batched beam search: beam__epyc.json not found (run its benchmark)" in tagged
    main = summary.lines(tmp_path)
    assert "batched beam search: 50 img/s (beam.json, 1 threads)" in main
    assert "batched beam search: beam.json not found (run its benchmark)" not in main
    assert summary.main(["--results", str(tmp_path), "--tag", "epyc"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("files __epyc)") and out[1:] == tagged
