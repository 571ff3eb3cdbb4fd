"""The local demo behind `make demo`: the whole system on one machine under a load whose hot adapter moves.

Modules: `cluster` starts and stops everything, `load` plans and sends the requests, `observe` reads the
cluster and the router each second, `view` draws the live screen, `report` writes the summary and plots.
"""
