"""`erpo-mega bench`: throughput of the real RL step, per phase and per device.

Small modules, one job each: `config` (the `bench:` section), `shapes` (named model sizes),
`flops` (the FLOP count), `peaks` (device peak TFLOP/s), `nvml` (GPU sampler), `memory`
(peak memory per rank), `runner` (the timed loop around the trainer's own step), `report`
(bench.json, markdown, PNG, console table), `merge` (scaling table), `plan` (predictions).
Importing this package imports nothing heavy.
"""
