"""The report's meta-state section lists what moved the monitor at its first alarm."""

from __future__ import annotations

from stabilitybench.report.data import ReportData
from stabilitybench.report.sections.latent import _where_it_started


def test_where_the_deviation_started_lists_each_alarmed_run_escaped() -> None:
    data = ReportData(
        audit={},
        records=[],
        runs={},
        attributions={
            "r1": {
                "workload": "gpt2-tiny",
                "label": "lr_spike<ramp>/seed0",
                "step": 141,
                "term": "features",
                "text": "grad_norm_layer_max @ transformer.h.3.attn.c_attn.weight (+8.1σ, 62%)",
            }
        },
    )
    html = _where_it_started(data)
    assert "Where the deviation started" in html
    assert "lr_spike&lt;ramp&gt;/seed0" in html and "<ramp>" not in html
    assert "transformer.h.3.attn.c_attn.weight" in html and ">141<" in html
    assert _where_it_started(ReportData(audit={}, records=[], runs={})) == ""
