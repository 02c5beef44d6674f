"""The studies of `testbed reproduce`: the CU-HLM / U-HLM experiments as resumable points, one report each.

Read top to bottom:
- sizes: the papers' headline numbers and the --size presets;
- fit: the rejection model and k* that parameterise the policies;
- scenarios: the base scenarios and the surgery on them (sizing, isolated devices, a policy per point);
- calibration: the calibration point (the calibration run of testbed.calibrate, reliability, offline k*);
- bootstrap: how sure the calibration is (cluster bootstrap over sequences, the risk-averse flip);
- points: running points resumably (Study);
- analysis: table rows, throughput, the accuracy bound, cu-hlm's frontier;
- paper, fleet: the two studies; estimate: their wall time before running;
- plots, report: the figures and the HTML page; sweep: the channel sweep over uplink rates.
"""
