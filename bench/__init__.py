"""`dgpt bench`: throughput and decoding benchmarks, measured as ratios in one process.

Every ratio is the median over alternating repetitions (A B A B ...), because the machines these
run on are shared and noisy. Suites: `train` (diffusion step vs a plain masked-LM step),
`sample` (sampler overhead, decoding methods on the skills test items, time vs length) and
`baseline` (a same-size GPT-2 trained on the same data). See bench/cli.py.
"""
