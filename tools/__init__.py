"""Developer tools (not packaged into the bundle): the benchmark and the paper's experiments.

Tools import `scripts`; `scripts` and the configs never import tools.
"""
