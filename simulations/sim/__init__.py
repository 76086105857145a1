"""The discrete-event churn simulator: event engine, network, model costs and strategies.

Used by `python -m simulations.churn` and its tests; drives swarm's own wiring and placement.
"""
