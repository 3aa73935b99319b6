"""The application: the `cadence` command, the local launcher, evaluation, reports and `cadence k8s`.

It is the only layer that wires service cores together; the library (`cadence.*` outside `cadence.app`)
and the services never import it (tests/unit/shared/test_layers.py).
"""
