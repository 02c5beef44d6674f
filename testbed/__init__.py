"""What a user touches: the `testbed` CLI, scenarios, the runner, metrics, results, reports."""
