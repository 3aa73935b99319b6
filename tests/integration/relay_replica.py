"""A replica that fetches one version through relay fan-out and then relays it until it is killed.

Launched by `test_broker_relay.py`: `python relay_replica.py BROKER RUN VERSION`; prints its relay address once
the version is fetched and verified, then serves it (the test kills it with SIGKILL mid-relay).
"""

from __future__ import annotations

import sys
import time

from cadence.clients import BrokerClient
from cadence.clients.relay import start_relay


def main() -> None:
    target, run_id, version = sys.argv[1], sys.argv[2], int(sys.argv[3])
    relay = start_relay("127.0.0.1", 0)
    with BrokerClient(target, run_id, relay=relay) as client:
        client.fetch(version)
        print(relay.address, flush=True)
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main()
