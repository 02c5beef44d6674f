"""Running a scenario, as a pipeline: validate -> plan -> engine (local | Ray) -> sinks -> write.

options      RunOptions: what a caller asks of one run besides the scenario
pipeline     run_scenario: the steps, top to bottom
plan         the scenario resolved into device specs, run parameters, dtypes, threads
local        the single-process engine
ray_setup    Ray started while planning; what each actor asks of it
ray_driver   the Ray engine's driver: start, poll, recover, finish
recovery     dead actors restarted by deterministic replay (docs/design.md section 9)
failures     RunFailed and its one-paragraph messages
write        tokens.parquet, summary.json, pass@1, the report
"""

from testbed.run.failures import RunFailed
from testbed.run.options import RunOptions
from testbed.run.pipeline import run_scenario
from testbed.run.plan import Plan, plan

__all__ = ["Plan", "RunFailed", "RunOptions", "plan", "run_scenario"]
