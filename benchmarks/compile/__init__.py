"""Helpers of ``python -m benchmarks.compile_report``: the AOT compile route (:mod:`.aot`) and the cases it
compiles (:mod:`.cases`)."""
