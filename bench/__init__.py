"""asv benchmarks and the stand-alone report (python -m bench.report) of hypergrad_fast."""
