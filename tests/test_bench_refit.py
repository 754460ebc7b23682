"""bench/bench_refit.py's --refit-tokens and --refit-dtypes reports, from reports of made-up numbers (the measurement
itself loads the real parents: `python -m bench.bench_refit --smoke --refit-tokens 256,512` runs it on SmolLM2 in a
minute)."""

from bench import bench_refit

SHAPE = {"layers": 20, "hidden": 384, "heads": 6, "kv_heads": 2, "ffn": 1024}


def report(base: int = 4096) -> dict:
    row = {"shape": SHAPE, "start": True, "1024": {"loss": 6.67, "seconds": 9.0},
           "4096": {"loss": 6.22, "seconds": 36.0}}
    return {"tokens": base, "refit_tokens": [1024, 4096], "machine": "test machine",
            "results": [{"parent": "default", "label": "SmolLM2", "tokens": base, "rows": [row]}]}


def test_each_count_shows_its_loss_its_seconds_and_its_difference_from_the_calibrations_count():
    text = bench_refit.tokens_markdown(report())
    assert "| SmolLM2 | 20 x 384, 6/2 heads, FFN 1024 (the Child page's start) | 6.67 (+0.45), 9 s | 6.22 (+0.00), 36 s |" \
        in text
    assert "refit on 1,024 tokens" in text and "test machine" in text


def test_without_a_refit_on_the_calibrations_count_no_difference_is_shown():
    text = bench_refit.tokens_markdown(report(base=2048))
    assert "6.67, 9 s" in text and "(+" not in text


def test_each_refit_dtype_shows_its_loss_its_seconds_and_its_difference_from_the_first():
    row = {"shape": SHAPE, "start": True, "float32": {"loss": 5.726, "seconds": 27.0},
           "bfloat16": {"loss": 5.721, "seconds": 15.0}}
    text = bench_refit.dtype_markdown({"tokens": 4096, "refit_dtypes": ["float32", "bfloat16"],
                                       "machine": "test machine", "notes": "Notes here.",
                                       "results": [{"parent": "default", "label": "SmolLM2", "rows": [row]}]})
    assert "| SmolLM2 | 20 x 384, 6/2 heads, FFN 1024 (the Child page's start) | 5.726, 27 s | 5.721 (-0.005), 15 s |" \
        in text
    assert "| refit in float32 | refit in bfloat16 |" in text and "test machine" in text and "Notes here." in text
