"""CU-HLM transmission policies: uncertainty estimators, rejection model and thresholds,
truncators, quantisers, their composition into a Policy, and the registry of presets.

Pure numpy/torch; never imports agents, netem or testbed.
"""
