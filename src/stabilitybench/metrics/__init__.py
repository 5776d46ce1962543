"""Stability metrics: collapse (point estimates), reliability (Chan et al. 2020), intervals
(rliable-style uncertainty), stability/decoupling/dose-response, and the audit summary."""
